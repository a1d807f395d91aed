"""Fig. 2 of the paper: how much MHSA and FFN change the last token's hidden state, layer by layer.

For every layer ``l`` and every prompt, at the prompt's last token, the residual stream entering the
layer, ``h^{l-1}`` (the input of block ``l``; for ``l = 0`` the embedding output, incl. GPT-2's position
embedding), is compared with

* ``a^l`` -- the output of the MHSA (component ``"MHSA"``), and
* ``m^l`` -- the output of the FFN (component ``"FFN"``),

(for Gemma-3, whose blocks normalise each component's output before the residual add, the normalised
vector, i.e. what the component adds to the residual stream, so that ``h^l = h^{l-1} + a^l + m^l`` holds),

by (i) cosine similarity in the hidden space and (ii) the Jaccard similarity (Eq. 7) of the top-``k``
vocabulary tokens of each vector under the logit lens ``T(v) = topk(W_U γ(v))`` (``γ`` the final norm,
``W_U`` the unembedding; ``k = 50`` in the paper). Means (and std, n) over prompts per layer make the two
panels of Fig. 2.

One batched forward pass (right padding; the true last token of every prompt is gathered) records all
layers at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import Trace

COMPONENTS = ("MHSA", "FFN")


# ------------------------------------------------------------------------------------------ measures
def jaccard(a, b) -> float:
    """Eq. 7 for two collections of token ids: ``|A ∩ B| / |A ∪ B|`` (1.0 for two empty sets)."""
    sa, sb = set(int(x) for x in a), set(int(x) for x in b)
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def topk_jaccard(ids_a: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """Row-wise Jaccard similarity of two ``[n, k]`` tensors of *distinct* token ids per row (e.g. top-k)."""
    if ids_a.shape != ids_b.shape:
        raise ValueError(f"shapes differ: {tuple(ids_a.shape)} vs {tuple(ids_b.shape)}")
    k = ids_a.shape[-1]
    inter = (ids_a.unsqueeze(-1) == ids_b.unsqueeze(-2)).sum(dim=(-1, -2)).to(torch.float64)
    return inter / (2 * k - inter)


def logit_lens(model: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits ``W_U γ(v)`` of hidden-space vectors ``[..., d]`` (final norm, then unembedding)."""
    norm, unembed = lens_modules(model)
    return unembed(norm(vectors))


def lens_modules(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(γ, W_U)``: ``layout.final_norm`` and ``layout.unembed``. When the layout's unembedding path is
    missing (transformers 5 renamed GPT-NeoX's ``embed_out`` to ``lm_head``) the model's
    ``get_output_embeddings()`` is used."""
    layout = model.layout
    norm = layout.module(model, "final_norm")
    try:
        unembed = layout.module(model, "unembed")
    except AttributeError:
        unembed = model.get_output_embeddings()
        if unembed is None:
            raise
    return norm, unembed


def logit_lens_topk(model: nn.Module, vectors: torch.Tensor, k: int = 50, chunk: int = 1024) -> torch.Tensor:
    """Top-``k`` token ids ``T(v)`` of each row of ``vectors [n, d]`` under the logit lens."""
    out = []
    for i in range(0, vectors.shape[0], chunk):
        out.append(logit_lens(model, vectors[i : i + chunk]).topk(k, dim=-1).indices)
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


# ------------------------------------------------------------------------------------------ states
def _last_token_states(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """``h_in``, ``a``, ``m`` at each row's last real token, each ``[batch, n_layers, d]``."""
    layout = model.layout
    n = layout.n_layers
    last = batch["attention_mask"].sum(1) - 1
    rows = torch.arange(last.shape[0])
    captured: dict[str, torch.Tensor] = {}

    def block0_input(module, args, kwargs):  # h^{-1}: what block 0 actually reads (wte + wpe for GPT-2)
        x = args[0] if args else kwargs["hidden_states"]
        captured["h0"] = x[rows, last].detach()

    handle = layout.block(model, 0).register_forward_pre_hook(block0_input, with_kwargs=True)
    sites = [(c, l) for l in range(n) for c in ("attn", "mlp")] + [("block", l) for l in range(n - 1)]
    try:
        # The output of the last block is not needed; stop there (skips the final norm and the logits).
        with Trace(model, record=sites, stop_after=("block", n - 1)) as tr:
            model(**batch, use_cache=False)
    finally:
        handle.remove()
    pick = lambda site: tr[site][rows, last]  # noqa: E731
    h_in = torch.stack([captured["h0"]] + [pick(("block", l)) for l in range(n - 1)], dim=1)
    a = torch.stack([_contribution(model, "attn", l, pick(("attn", l))) for l in range(n)], dim=1)
    m = torch.stack([_contribution(model, "mlp", l, pick(("mlp", l))) for l in range(n)], dim=1)
    return {"h_in": h_in, "a": a, "m": m}


def _contribution(model: nn.Module, component: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """What the component adds to the residual stream: ``a^l`` / ``m^l`` itself, or its post-norm (Gemma-3)."""
    fn = getattr(model.layout, "residual_contribution", None)
    return fn(model, component, layer, x) if fn is not None else x


def _tokenize(tok, prompts: Sequence[str], device) -> dict:
    old = tok.padding_side
    tok.padding_side = "right"  # positions then start at 0 for every row; the last real token is gathered
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


@torch.no_grad()
def similarity_per_prompt(
    model: nn.Module, tok, prompts: Sequence[str], k: int = 50, batch_size: int = 32, progress: bool = True
) -> dict[str, np.ndarray]:
    """Per-prompt measures: ``cosine`` and ``jaccard``, each ``{"MHSA"|"FFN": array [n_prompts, n_layers]}``."""
    device = next(model.parameters()).device
    n_layers = model.layout.n_layers
    res = {m: {c: [] for c in COMPONENTS} for m in ("cosine", "jaccard")}
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="Fig. 2 similarity", total=math.ceil(len(prompts) / batch_size))
    for s in starts:
        batch = _tokenize(tok, prompts[s : s + batch_size], device)
        st = _last_token_states(model, batch)
        b, d = st["h_in"].shape[0], st["h_in"].shape[-1]
        top = {key: logit_lens_topk(model, st[key].reshape(b * n_layers, d).float(), k) for key in st}
        for comp, key in (("MHSA", "a"), ("FFN", "m")):
            cos = F.cosine_similarity(st["h_in"].double(), st[key].double(), dim=-1)
            jac = topk_jaccard(top["h_in"], top[key]).reshape(b, n_layers)
            res["cosine"][comp].append(cos.cpu().numpy())
            res["jaccard"][comp].append(jac.cpu().numpy())
    return {
        m: {c: np.concatenate(v[c]) if v[c] else np.zeros((0, n_layers)) for c in COMPONENTS} for m, v in res.items()
    }


def component_similarity(
    model: nn.Module, tok, prompts: Sequence[str], k: int = 50, batch_size: int = 32, progress: bool = True
) -> pd.DataFrame:
    """Fig. 2's data: one row per ``(layer, component)`` with the mean (and std, n) over prompts of the
    cosine similarity and the top-``k`` Jaccard similarity between ``h^{l-1}`` and ``a^l`` (MHSA) or ``m^l`` (FFN).

    Columns: ``layer, component, cosine, jaccard, cosine_std, jaccard_std, n``.
    """
    raw = similarity_per_prompt(model, tok, prompts, k=k, batch_size=batch_size, progress=progress)
    rows = []
    for comp in COMPONENTS:
        cos, jac = raw["cosine"][comp], raw["jaccard"][comp]
        for layer in range(cos.shape[1]):
            rows.append(
                {
                    "layer": layer,
                    "component": comp,
                    "cosine": float(cos[:, layer].mean()),
                    "jaccard": float(jac[:, layer].mean()),
                    "cosine_std": float(cos[:, layer].std(ddof=1)) if len(cos) > 1 else 0.0,
                    "jaccard_std": float(jac[:, layer].std(ddof=1)) if len(jac) > 1 else 0.0,
                    "n": int(cos.shape[0]),
                }
            )
    return pd.DataFrame(rows).sort_values(["component", "layer"], ignore_index=True)


# ------------------------------------------------------------------------------------------ the claim
def claim_summary(df: pd.DataFrame, split: int | None = None) -> pd.DataFrame:
    """Numbers behind the paper's qualitative claim about Fig. 2.

    The claim (GPT-J, split at layer 15 of 28): after the middle layers the FFN's before/after similarity
    changes slowly and stabilises (or increases) while MHSA's keeps changing. For each measure and
    component this returns, over the layers ``>= split`` (default: ``n_layers // 2``) and, for reference,
    the layers before it: the mean similarity, the mean absolute layer-to-layer change ("rate of change")
    and the least-squares slope per layer.
    """
    n_layers = int(df["layer"].max()) + 1
    split = n_layers // 2 if split is None else split
    rows = []
    for measure in ("cosine", "jaccard"):
        for comp in COMPONENTS:
            s = df[df.component == comp].sort_values("layer").set_index("layer")[measure]
            for part, sub in (("early", s[s.index < split]), ("late", s[s.index >= split])):
                x = sub.index.to_numpy(dtype=float)
                slope = float(np.polyfit(x, sub.to_numpy(), 1)[0]) if len(sub) > 1 else float("nan")
                rows.append(
                    {
                        "measure": measure,
                        "component": comp,
                        "layers": f"{int(x.min())}-{int(x.max())}",
                        "part": part,
                        "mean": float(sub.mean()),
                        "mean_abs_change": float(sub.diff().abs().mean()) if len(sub) > 1 else float("nan"),
                        "slope": slope,
                    }
                )
    return pd.DataFrame(rows)


def claim_verdict(summary: pd.DataFrame) -> dict[str, bool]:
    """Boolean checks of the claim on the late layers, per measure: FFN changes less from layer to layer
    than MHSA (``ffn_steadier``), FFN's slope is >= 0 (``ffn_not_decreasing``), and FFN's similarity is
    higher than MHSA's (``ffn_more_similar``)."""
    late = summary[summary.part == "late"].set_index(["measure", "component"])
    out = {}
    for measure in ("cosine", "jaccard"):
        f, m = late.loc[(measure, "FFN")], late.loc[(measure, "MHSA")]
        out[f"{measure}: ffn_steadier"] = bool(f.mean_abs_change < m.mean_abs_change)
        out[f"{measure}: ffn_not_decreasing"] = bool(f.slope >= -1e-9)
        out[f"{measure}: ffn_more_similar"] = bool(f["mean"] > m["mean"])
    return out


# ------------------------------------------------------------------------------------------ plot
def plot_similarity(df: pd.DataFrame, title: str | None = None, split: int | None = None):
    """The paper's two panels: mean cosine (left) and mean top-k Jaccard (right) similarity per layer,
    MHSA vs FFN. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
    palette = {"MHSA": "tab:red", "FFN": "tab:green"}
    for ax, measure, label in (
        (axes[0], "cosine", "cosine similarity"),
        (axes[1], "jaccard", "Jaccard similarity (top-k)"),
    ):
        sns.lineplot(
            data=df,
            x="layer",
            y=measure,
            hue="component",
            style="component",
            markers=True,
            dashes=False,
            palette=palette,
            ax=ax,
            hue_order=list(COMPONENTS),
            style_order=list(COMPONENTS),
        )
        if split is not None:
            ax.axvline(split - 0.5, color="grey", ls=":", lw=1)
        ax.set_ylabel(f"mean {label}")
        ax.set_xlabel("layer $l$")
        ax.legend(title=None, frameon=False)
    axes[0].set_title(r"cos($h^{l-1}$, $a^l$) vs cos($h^{l-1}$, $m^l$)")
    axes[1].set_title(r"$J_k(T(h^{l-1}), T(\cdot))$")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
