"""Causal tracing (Meng et al. 2022a, ROME §2.1), batched for CPUs.

For a prompt, its subject and an answer token:

(a) *clean* run: ``p_clean = P(answer | prompt)``, all hidden states recorded;
(b) *corrupted* runs: Gaussian noise ``N(0, ν²)`` is added to the embeddings of the subject's tokens
    (``ν = 3 ×`` the standard deviation of the subject-token embeddings, as ROME), ``n_samples`` draws;
    ``p_corrupted`` is the answer probability averaged over the draws;
(c) *corrupted-with-restoration* runs: the same noise draws, and one state is set back to its clean value
    at one token position: the block output ``h^l`` (kind ``"block"``, a single layer), or the MLP output
    ``m`` / attention output ``a`` (kinds ``"mlp"`` / ``"attn"``) of a *window* of layers centred on ``l``
    (``range(max(0, l - w//2), min(L, l - (-w//2)))``, ROME's convention; ROME used ``w = 10`` of GPT-2 XL's
    48 layers, here the default is ``w = 5``, about the same fraction of smollm2's 30 layers).

The indirect effect of a state is ``P_restored(answer) − p_corrupted``.

Speed: every restoration of a trace (kind × layer × position) and every noise draw is a row of one batch
(chunked to ``max_batch`` rows), with the same noise draws reused for every restoration (common random
numbers, as ROME, whose noise generator is re-seeded for each restoration). Only the last position's
logits are computed.

Noise draws come from ``torch.Generator().manual_seed(seed)``, fresh for every fact, so results are
deterministic for a seed.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..hooks import Trace

KINDS = ("block", "mlp", "attn")
KIND_LABELS = {"block": "hidden state $h^l$", "mlp": "MLP $m^l$", "attn": "attention $a^l$"}
KIND_COLORS = {"block": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
KIND_CMAPS = {"block": "Purples", "mlp": "Greens", "attn": "Reds"}


# ------------------------------------------------------------------------------------------ tokens
def encode(tok, prompt: str) -> list[int]:
    """Token ids of a prompt exactly as the model reads it (the tokenizer's own special tokens, if any)."""
    return tok(prompt)["input_ids"]


def subject_token_range(tok, prompt: str, subject: str) -> tuple[int, int]:
    """Token positions ``[begin, end)`` of the (last occurrence of the) subject in the tokenized prompt:
    every token whose character span overlaps the subject's."""
    c0 = prompt.rfind(subject)
    if c0 < 0:
        raise ValueError(f"subject {subject!r} not in prompt {prompt!r}")
    c1 = c0 + len(subject)
    enc = tok(prompt, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
    if not hits:
        raise ValueError(f"no token of {prompt!r} covers the subject {subject!r}")
    return hits[0], hits[-1] + 1


def answer_token(tok, attribute: str) -> int:
    """First token of ``" " + attribute`` (the continuation of a prompt, ROME's convention)."""
    return tok(" " + attribute.strip(), add_special_tokens=False)["input_ids"][0]


def _window(layer: int, n_layers: int, window: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _logits_kwargs(model: nn.Module) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


# ------------------------------------------------------------------------------------------ noise
@torch.no_grad()
def embedding_noise_std(model: nn.Module, tok, subjects: Sequence[str]) -> float:
    """Standard deviation of the token embeddings of all the subjects' tokens (ROME's ``collect_embedding_std``).

    Multiply by 3 for the noise scale ``ν`` of causal tracing."""
    emb = model.layout.module(model, "embed")
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"]]
    w = emb(torch.tensor(ids, device=emb.weight.device))
    return float(w.float().std())


# ------------------------------------------------------------------------------------------ facts
@torch.no_grad()
def predict_next(model: nn.Module, tok, prompts: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Greedy next token and its probability for each prompt (batched, right padding; the final norm and
    unembedding are applied to each prompt's last real token only)."""
    from .similarity import _tokenize, lens_modules

    device = next(model.parameters()).device
    n = model.layout.n_layers
    norm, unembed = lens_modules(model)
    ids, probs = [], []
    for s in range(0, len(prompts), batch_size):
        batch = _tokenize(tok, prompts[s : s + batch_size], device)
        with Trace(model, record=[("block", n - 1)], stop_after=("block", n - 1)) as tr:
            model(**batch, use_cache=False)
        last = batch["attention_mask"].sum(1) - 1
        h = tr["block", n - 1][torch.arange(len(last)), last]
        p = unembed(norm(h)).float().softmax(-1)
        top = p.max(-1)
        ids.append(top.indices.cpu().numpy())
        probs.append(top.values.cpu().numpy())
    return np.concatenate(ids), np.concatenate(probs)


def select_facts(
    model: nn.Module, tok, facts: Sequence, only_correct: bool = True, batch_size: int = 64
) -> pd.DataFrame:
    """One row per fact with the model's greedy next token: ``known_id, prompt, subject, attribute,
    answer_id, answer, p_top1, correct`` (``correct``: the greedy token is the first token of
    ``" " + attribute``). With ``only_correct`` only correct facts are kept (the answer is then the
    attribute's first token); otherwise all facts are kept with the model's own top-1 token as the answer."""
    top, p = predict_next(model, tok, [f.prompt for f in facts], batch_size=batch_size)
    rows = []
    for f, t, q in zip(facts, top, p):
        gold = answer_token(tok, f.attribute)
        rows.append(
            {
                "known_id": f.known_id,
                "prompt": f.prompt,
                "subject": f.subject,
                "attribute": f.attribute,
                "answer_id": int(t),
                "answer": tok.decode([int(t)]),
                "p_top1": float(q),
                "correct": bool(int(t) == gold),
            }
        )
    df = pd.DataFrame(rows)
    return df[df.correct].reset_index(drop=True) if only_correct else df


# ------------------------------------------------------------------------------------------ tracing
def _resolve_positions(positions, n_tokens: int, subj: tuple[int, int]) -> list[int]:
    named = {"subject_last": subj[1] - 1, "last": n_tokens - 1, "subject_first": subj[0]}
    if positions in (None, "all"):
        return list(range(n_tokens))
    if isinstance(positions, str):
        positions = [p for p in positions.replace("+", ",").split(",") if p]
    out = []
    for p in positions:
        q = named[p] if isinstance(p, str) else int(p) % n_tokens
        if q not in out:
            out.append(q)
    return out


@torch.no_grad()
def trace_fact(
    model: nn.Module,
    tok,
    prompt: str,
    subject: str,
    answer: int | str | None = None,
    kinds: Sequence[str] = KINDS,
    noise: float = 0.1,
    n_samples: int = 10,
    window: int = 5,
    positions="all",
    seed: int = 0,
    max_batch: int = 512,
) -> dict:
    """Causal trace of one prompt (see the module docstring).

    ``answer``: a token id, a string (its first token after a space is used) or ``None`` (the model's
    greedy prediction). ``noise``: the absolute noise scale ``ν`` (e.g. ``3 * embedding_noise_std(...)``).
    ``positions``: ``"all"``, or names/indices (``"subject_last"``, ``"last"``, ``"subject_first"``, ints,
    or a ``"subject_last+last"`` string).

    Returns a dict of arrays: ``tokens`` (str per position), ``subject_range`` ``(b, e)``, ``positions``
    ``[P]``, ``answer_id``, ``answer``, ``p_clean``, ``p_corrupted``, ``p_corrupted_samples`` ``[n_samples]``,
    and for each kind ``k``: ``restored[k]`` and ``effect[k]`` (``[P, n_layers]``: answer probability with
    the restoration, and its indirect effect ``restored - p_corrupted``), plus ``window``, ``noise``, ``seed``.
    """
    layout = model.layout
    n_layers = layout.n_layers
    device = next(model.parameters()).device
    ids = encode(tok, prompt)
    T = len(ids)
    b, e = subject_token_range(tok, prompt, subject)
    pos_list = _resolve_positions(positions, T, (b, e))
    x = torch.tensor([ids], device=device)
    extra = _logits_kwargs(model)

    # (a) clean run, recording every state a restoration may need
    needed = sorted({(k, l) for k in kinds for l in range(n_layers)})
    with Trace(model, record=needed) as tr:
        logits = model(input_ids=x, use_cache=False, **extra).logits[0, -1]
    clean = {site: t[0] for site, t in tr.outputs.items()}  # [T, d]
    p_all = logits.float().softmax(-1)
    if answer is None:
        answer_id = int(p_all.argmax())
    elif isinstance(answer, str):
        answer_id = answer_token(tok, answer)
    else:
        answer_id = int(answer)
    p_clean = float(p_all[answer_id])

    # noise draws: [n_samples, e-b, d], shared by every restoration
    d = clean[needed[0]].shape[-1] if needed else layout.module(model, "embed").weight.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    draws = (noise * torch.randn(n_samples, e - b, d, generator=gen, dtype=torch.float32)).to(device)

    # the restorations: config 0 = none (corrupted baseline), then (kind, position, layer)
    configs: list[tuple[str, int, int] | None] = [None]
    configs += [(k, p, l) for k in kinds for p in pos_list for l in range(n_layers)]
    per_chunk = max(1, max_batch // n_samples)
    probs = np.empty((len(configs), n_samples))
    for c0 in range(0, len(configs), per_chunk):
        chunk = configs[c0 : c0 + per_chunk]
        rows_total = len(chunk) * n_samples
        spec: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)  # site -> (row, pos)
        for j, cfg in enumerate(chunk):
            if cfg is None:
                continue
            kind, pos, layer = cfg
            layers = [layer] if kind == "block" else list(_window(layer, n_layers, window))
            for l in layers:
                for r in range(j * n_samples, (j + 1) * n_samples):
                    spec[(kind, l)].append((r, pos))
        tiled = draws.repeat(len(chunk), 1, 1)

        def corrupt(h, tiled=tiled):
            h = h.clone()
            h[:, b:e] += tiled.to(h.dtype)
            return h

        def restorer(site, pairs):
            rows = torch.tensor([r for r, _ in pairs], device=device)
            poss = torch.tensor([p for _, p in pairs], device=device)
            values = clean[site][poss]

            def fn(h):
                h = h.clone()
                h[rows, poss] = values.to(h.dtype)
                return h

            return fn

        add = {("embed", 0): corrupt, **{site: restorer(site, pairs) for site, pairs in spec.items()}}
        with Trace(model, add=add):
            out = model(input_ids=x.expand(rows_total, T), use_cache=False, **extra).logits[:, -1]
        p = out.float().softmax(-1)[:, answer_id].reshape(len(chunk), n_samples)
        probs[c0 : c0 + len(chunk)] = p.cpu().numpy()

    p_corr_samples = probs[0]
    p_corrupted = float(p_corr_samples.mean())
    restored, effect = {}, {}
    means = probs.mean(1)
    i = 1
    for k in kinds:
        arr = means[i : i + len(pos_list) * n_layers].reshape(len(pos_list), n_layers)
        i += len(pos_list) * n_layers
        restored[k] = arr
        effect[k] = arr - p_corrupted
    return {
        "tokens": [tok.decode([t]) for t in ids],
        "subject_range": (b, e),
        "positions": np.array(pos_list),
        "answer_id": answer_id,
        "answer": tok.decode([answer_id]),
        "p_clean": p_clean,
        "p_corrupted": p_corrupted,
        "p_corrupted_samples": p_corr_samples,
        "restored": restored,
        "effect": effect,
        "window": window,
        "noise": noise,
        "seed": seed,
        "n_samples": n_samples,
    }


def trace_facts(
    model: nn.Module,
    tok,
    facts: Sequence | pd.DataFrame,
    kinds: Sequence[str] = KINDS,
    noise: float | None = None,
    n_samples: int = 10,
    window: int = 5,
    positions="subject_last",
    seed: int = 0,
    max_batch: int = 512,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`trace_fact` over many facts, long format.

    ``facts``: the frame of :func:`select_facts` (its ``answer_id`` is traced) or records with ``prompt``,
    ``subject`` (and optionally ``known_id``; then the model's greedy prediction is the answer).
    ``noise``: absolute scale; ``None`` = 3 × :func:`embedding_noise_std` over these facts' subjects.

    Columns: ``fact, kind, layer, position (name), token_index, effect, restored, p_clean, p_corrupted``.
    """
    if isinstance(facts, pd.DataFrame):
        recs = facts.to_dict("records")
    else:
        recs = [
            {"known_id": getattr(f, "known_id", i), "prompt": f.prompt, "subject": f.subject}
            for i, f in enumerate(facts)
        ]
    if noise is None:
        noise = 3 * embedding_noise_std(model, tok, [r["subject"] for r in recs])
    it = recs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(recs, desc="causal tracing")
    rows = []
    for r in it:
        res = trace_fact(
            model,
            tok,
            r["prompt"],
            r["subject"],
            answer=r.get("answer_id"),
            kinds=kinds,
            noise=noise,
            n_samples=n_samples,
            window=window,
            positions=positions,
            seed=seed,
            max_batch=max_batch,
        )
        n_tok = len(res["tokens"])
        names = {res["subject_range"][1] - 1: "subject_last", n_tok - 1: "last"}
        for k in kinds:
            for pi, pos in enumerate(res["positions"]):
                for layer in range(res["effect"][k].shape[1]):
                    rows.append(
                        {
                            "fact": r.get("known_id"),
                            "kind": k,
                            "layer": layer,
                            "position": names.get(int(pos), str(int(pos))),
                            "token_index": int(pos),
                            "effect": float(res["effect"][k][pi, layer]),
                            "restored": float(res["restored"][k][pi, layer]),
                            "p_clean": res["p_clean"],
                            "p_corrupted": res["p_corrupted"],
                        }
                    )
    df = pd.DataFrame(rows)
    df.attrs.update(noise=noise, n_samples=n_samples, window=window, seed=seed)
    return df


# ------------------------------------------------------------------------------------------ aggregate
def average_effects(df: pd.DataFrame, position: str = "subject_last") -> pd.DataFrame:
    """Average indirect effect over facts per ``(kind, layer)`` at one position (ROME's aggregate curve).

    Columns: ``kind, layer, effect (mean), std, sem, n``, plus ``effect_rel`` = mean of
    ``effect / (p_clean − p_corrupted)`` (the share of the clean-vs-corrupted gap that is recovered)."""
    d = df[df.position == position].copy()
    gap = d.p_clean - d.p_corrupted
    d["effect_rel"] = np.where(gap.abs() > 1e-12, d.effect / gap.where(gap.abs() > 1e-12, 1.0), np.nan)
    g = d.groupby(["kind", "layer"])
    out = g.agg(
        effect=("effect", "mean"), std=("effect", "std"), n=("effect", "size"), effect_rel=("effect_rel", "mean")
    ).reset_index()
    out["sem"] = out["std"] / np.sqrt(out["n"])
    return out[["kind", "layer", "effect", "std", "sem", "n", "effect_rel"]]


def effect_table(avg: pd.DataFrame) -> pd.DataFrame:
    """Wide table: one row per layer, a column per kind with the mean indirect effect."""
    return avg.pivot(index="layer", columns="kind", values="effect").reset_index().rename_axis(None, axis=1)


def choose_critical_layers(
    avg: pd.DataFrame,
    size: int = 5,
    kind: str = "mlp",
    search_fraction: float = 2 / 3,
    window: int = 1,
    exclude: Sequence[int] = (),
) -> dict:
    """The critical layers ``R`` from the average MLP indirect effect at the subject's last token.

    Rule (MEMIT's choice for GPT-J, R = 3..8: where the MLP effect is high in the early/mid network, ending
    at its peak): the peak ``L`` is the layer (window centre) with the largest mean ``kind`` effect among the
    first ``search_fraction`` of the layers, skipping centres whose restored window
    (``window`` layers, as traced) contains a layer of ``exclude`` (e.g. ``(0,)``: the first MLP, whose
    effect on a corrupted subject is that of an extended token embedding; MEMIT never edits it);
    ``R`` is the ``size`` contiguous layers ending at ``L`` (starting no lower than the first layer
    outside ``exclude``). Returns ``{"layers", "peak", "peak_effect", "window_mean_effect", "rule"}``.
    """
    s = avg[avg.kind == kind].set_index("layer")["effect"].sort_index()
    n = len(s)
    limit = max(1, math.ceil(n * search_fraction))
    excl = set(int(x) for x in exclude)
    cands = [c for c in range(limit) if not excl & set(_window(c, n, window))]
    if not cands:  # tiny models: every window touches an excluded layer; fall back to no exclusion
        cands, excl = list(range(limit)), set()
    peak = int(s.loc[cands].idxmax())
    lowest = min(l for l in range(n) if l not in excl)
    start = max(lowest, peak - size + 1)
    layers = tuple(range(start, start + size))
    skipped = f", skipping centres whose {window}-layer window contains layer(s) {sorted(excl)}" if excl else ""
    return {
        "layers": layers,
        "peak": peak,
        "peak_effect": float(s.loc[peak]),
        "window_mean_effect": float(s.loc[list(layers)].mean()),
        "rule": (
            f"peak L = argmax of the mean {kind.upper()} indirect effect at the subject's last token over "
            f"layers 0..{limit - 1} (first {search_fraction:.2g} of the {n} layers){skipped}; R = the {size} "
            f"contiguous layers ending at L"
        ),
    }


# ------------------------------------------------------------------------------------------ plots
def plot_effect_curves(
    avg: pd.DataFrame,
    critical: Sequence[int] | None = None,
    title: str | None = None,
    window: int | None = None,
    critical_label: str = "critical layers",
):
    """ROME-style summary: mean indirect effect at the subject's last token per layer, one line per kind
    (shaded: ± 1.96 SEM), the chosen critical layers shaded grey. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if critical:
        ax.axvspan(
            min(critical) - 0.5,
            max(critical) + 0.5,
            color="0.85",
            zorder=0,
            label=f"{critical_label} {min(critical)}-{max(critical)}",
        )
    for k in [k for k in KINDS if k in set(avg.kind)]:
        s = avg[avg.kind == k].sort_values("layer")
        lab = KIND_LABELS[k] + ("" if k == "block" or not window else f" (window {window})")
        ax.plot(s.layer, s.effect, marker="o", ms=3, color=KIND_COLORS[k], label=lab)
        ax.fill_between(
            s.layer, s.effect - 1.96 * s["sem"], s.effect + 1.96 * s["sem"], color=KIND_COLORS[k], alpha=0.2, lw=0
        )
    ax.set_xlabel("layer (centre of the restored window for MLP/attention)")
    ax.set_ylabel("average indirect effect\n$P_{restored} - P_{corrupted}$")
    ax.set_title(title or "Causal tracing at the subject's last token")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_trace_heatmaps(result: dict, kinds: Sequence[str] | None = None, title: str | None = None):
    """Token × layer heatmaps (one panel per kind) of the restored answer probability for one
    :func:`trace_fact` result traced with ``positions="all"``; subject tokens are starred."""
    import matplotlib.pyplot as plt

    kinds = list(kinds or result["restored"].keys())
    labels = [repr(result["tokens"][p])[1:-1] for p in result["positions"]]
    b, e = result["subject_range"]
    labels = [lab + ("*" if b <= p < e else "") for lab, p in zip(labels, result["positions"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 0.28 * len(labels) + 1.4), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        im = ax.pcolormesh(result["restored"][k], cmap=KIND_CMAPS[k], vmin=result["p_corrupted"])
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(labels)) + 0.5)
        ax.set_yticklabels(labels if ax is axes[0][0] else [], fontsize=7)
        ax.set_xlabel("layer" if k == "block" else f"centre of {result['window']} restored layers")
        ax.set_title(f"restore {KIND_LABELS[k]}", fontsize=9)
        cb = fig.colorbar(im, ax=ax)
        cb.ax.set_title(f"p({result['answer'].strip()})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def subsample(items: Sequence, n: int | None, seed: int = 0) -> list:
    """A seeded random subset of ``n`` items in their original order (all items when ``n`` is None or
    not smaller than ``len(items)``)."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    keep = sorted(np.random.default_rng(seed).choice(len(items), size=n, replace=False).tolist())
    return [items[i] for i in keep]


def critical_layers_report(
    per_fact: pd.DataFrame,
    model_name: str,
    size: int = 5,
    search_fraction: float = 2 / 3,
    window: int = 1,
    exclude: Sequence[int] = (),
    n_correct: int | None = None,
    n_total: int | None = None,
    **settings,
) -> str:
    """Markdown evidence for a critical-layer choice from :func:`trace_facts`' long frame (or its CSV):
    the rule, the settings, the chosen layers and the per-layer table of mean indirect effects."""
    avg = average_effects(per_fact, position="subject_last")
    crit = choose_critical_layers(avg, size=size, search_fraction=search_fraction, window=window, exclude=exclude)
    n_facts = per_fact["fact"].nunique()
    wide = avg.pivot(index="layer", columns="kind", values="effect")
    sem = avg.pivot(index="layer", columns="kind", values="sem")
    kinds = [k for k in KINDS if k in wide.columns]
    lines = [
        f"Critical layers of `{model_name}`: **R = {list(crit['layers'])}** (L = max R = {max(crit['layers'])})",
        "",
        f"* Rule: {crit['rule']}.",
        f"* Peak MLP indirect effect {crit['peak_effect']:.4f} at layer {crit['peak']} (window centre).",
        f"* Facts: {n_facts} traced"
        + (
            f" (seeded random subset of the {n_correct} of {n_total} known facts the model answers correctly)"
            if n_correct is not None
            else ""
        )
        + ".",
    ]
    lines += [f"* {k}: {v}" for k, v in settings.items()]
    lines += [
        "",
        "Mean indirect effect P_restored(answer) - P_corrupted(answer) at the subject's last token "
        "(± SEM over facts; MLP/attention: window centred on the layer):",
        "",
        "| layer | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for layer in wide.index:
        mark = " **(R)**" if layer in crit["layers"] else ""
        cells = [f"{wide.loc[layer, k]:+.4f} ± {sem.loc[layer, k]:.4f}" for k in kinds]
        lines.append(f"| {layer}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
