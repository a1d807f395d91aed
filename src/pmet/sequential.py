"""Sequential (lifelong) editing: T rounds of b edits, each on the model the earlier rounds left.

The paper edits once, in one batch. Here round ``t`` edits the next ``b`` CounterFact records on the
*already edited* model: keys, current outputs and value vectors come from the current weights (the editor
does that by itself), the key statistics ``C0`` are those of the unedited model (as the paper's and every
sequential-editing study's: the editor loads them from the statistics cache, keyed by the model's
fingerprint, which reads none of the edited weights -- :func:`run_sequential` checks that it stays the same).
For the null-space variants (``pmet-ns``, ``memit-ns`` = AlphaEdit) the keys of every earlier round are
passed on as ``Kp Kpᵀ`` (AlphaEdit's sequential term, :func:`pmet.editing.core.solve_update_null_space`); the
projection ``P`` stays that of ``C0``, as AlphaEdit's code computes it once before the first round.

After every round (and once before the first, round 0) it measures:

* ``efficacy`` / ``generalization`` / ``specificity`` of **every edit made so far** (CounterFact's per-record
  definitions, :mod:`pmet.evaluation.counterfact`), and ``efficacy_first_round`` (the first round's edits
  only: how much of the oldest edits survives);
* ``retention_neighborhood`` / ``retention_known``: the fraction of a fixed set of prompts -- the
  neighbourhood prompts of ``n_retention`` CounterFact records that are never edited, and ``n_known`` facts of
  ROME's known-facts set -- whose top-1 next token is still the one the *unedited* model predicted;
* ``perplexity``: on a fixed slice of WikiText-2 (``ppl_tokens`` tokens of its validation split, which the key
  statistics never read);
* per edited weight, of the cumulative change ``ΔW = W_t - W_0``: ``‖ΔW‖_F``, its largest singular value
  ``σ_max(ΔW)``, and the condition number of the edited weight ``cond(W_t) = σ_max/σ_min`` (``cond(W_0)`` at
  round 0); the aggregates ``delta_fro`` (``sqrt Σ_l ‖ΔW_l‖²``) and ``cond_max``.

Runs are cached and resumable per round: the run folder (``runs_dir/<model>/<dataset>/sequential/<method>/
b<b>_seed<s>_hp<id>_...``) holds ``reference.json`` (the unedited model's answers and perplexity),
``round_<t>.json`` for every finished round and ``weights_<t>.safetensors`` (the cumulative edited weights,
plus ``Kp Kpᵀ`` for the null-space variants) of the last finished round (written before its ``round_<t>.json``;
the previous round's file is removed after it). An interrupted run resumes at the next
round; a longer run (larger ``rounds``, same ``batch`` and seed) extends a shorter one, since the records of
round ``t`` do not depend on ``rounds``. The run folder is locked while it runs (:func:`pmet.experiments.run_lock`).

:func:`save_sequential_runs` writes each method's result as a committed run file
(``results/<model>/sequential/<method>_r<T>x<b>_...jsonl.gz``, :mod:`pmet.runstore`): the per-record values of
every edit after the last round, the per-prompt retention, every round's numbers. :mod:`pmet.claims` reads them,
offline, for the "Sequential" block of ``tables/claims.md`` (paired tests on the same edits and prompts).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .experiments import (
    _artifact_id,
    _has_field,
    _hparams_id,
    method_hparams,
    run_lock,
    table_records,
    table_selection,
)
from .paths import cache_dir, shown

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "collapse_point",
    "load_sequential_run",
    "null_space_dims",
    "perplexity",
    "plot_sequential",
    "run_sequential",
    "save_sequential_run",
    "save_sequential_runs",
    "sequential_claims",
    "sequential_frame",
    "top_tokens",
    "weight_stats",
]

FORMAT_VERSION = 2  # 2: rounds record their spec, the per-prompt retention and the records they edited


# ------------------------------------------------------------------------------------------ measurements
@torch.no_grad()
def top_tokens(model, tok, prompts: list[str], batch_size: int = 32) -> list[int]:
    """The top-1 next token after each prompt (right-padded batches, read at each prompt's last token)."""
    from .editing.tokens import pad_id_of, pad_right
    from .evaluation.scoring import prompt_ids

    device = next(model.parameters()).device
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tok, p) for p in prompts[start : start + batch_size]]
        x, mask = pad_right(ids, pad_id_of(tok), device)
        last = mask.sum(1) - 1
        logits = model(input_ids=x, attention_mask=mask).logits
        out += logits[torch.arange(len(ids), device=device), last].argmax(-1).tolist()
    return out


def corpus_windows(tok, n_tokens: int, seq_len: int = 256) -> torch.Tensor:
    """The fixed perplexity slice: the first ``n_tokens`` tokens of WikiText-2's validation split (the
    ``wikitext-2-raw`` corpus), cut into ``[n, seq_len]`` windows."""
    from .data import load_text_corpus
    from .stats import corpus_token_windows

    return corpus_token_windows(tok, load_text_corpus("wikitext-2-raw"), seq_len, n_tokens)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token NLL over every predicted token of ``windows`` (``[n, seq_len]`` ids)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        x = windows[start : start + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def weight_stats(w0: torch.Tensor, w: torch.Tensor) -> dict:
    """``delta_fro`` = ‖W - W0‖_F, ``delta_sigma_max`` = σ_max(W - W0), ``cond`` = σ_max(W)/σ_min(W)
    (singular values in float64)."""
    w0, w = w0.detach().double().cpu(), w.detach().double().cpu()
    d = w - w0
    s_delta = torch.linalg.svdvals(d)
    s = torch.linalg.svdvals(w)
    return {
        "delta_fro": float(torch.linalg.norm(d)),
        "delta_sigma_max": float(s_delta[0]),
        "cond": float(s[0] / s[-1]) if float(s[-1]) > 0 else math.inf,
    }


# ---------------------------------------------------------------------------------------------- the run
def _retention_prompts(dataset: str, n_retention: int, n_known: int, seed: int) -> dict[str, list[str]]:
    """The fixed prompts retention is measured on: the neighbourhood prompts of the *last* ``n_retention``
    records of the table's seeded permutation (edited records are taken from its start) and ``n_known``
    seeded known facts."""
    from .data import load_known_facts

    pool = table_records(dataset, None, seed)
    held_out = pool[len(pool) - n_retention :] if n_retention else []
    known = load_known_facts()
    picks = sorted(random.Random(seed).sample(range(len(known)), min(n_known, len(known))))
    return {
        "neighborhood": [p for r in held_out for p in r.neighborhood_prompts],
        "known": [known[i].prompt for i in picks],
        "held_out_ids": [r.case_id for r in held_out],
    }


def _measure(model, tok, past, prompts, reference, windows, originals, first_ids, eval_batch_size) -> dict:
    """Everything :func:`run_sequential` records after a round (module docstring)."""
    from .evaluation import evaluate_counterfact

    out: dict = {}
    if past:
        rows = evaluate_counterfact(model, tok, past, batch_size=eval_batch_size, generation=False, progress=False)
        for m in ("efficacy", "generalization", "specificity"):
            vals = [r[m] for r in rows if r.get(m) is not None]
            out[m] = 100.0 * sum(vals) / len(vals) if vals else None
        first = [r["efficacy"] for r in rows if r["case_id"] in first_ids and r.get("efficacy") is not None]
        out["efficacy_first_round"] = 100.0 * sum(first) / len(first) if first else None
        out["records"] = {
            str(r["case_id"]): [r.get("efficacy"), r.get("generalization"), r.get("specificity")] for r in rows
        }
    out["retained"] = {}
    for kind in ("neighborhood", "known"):
        ps = prompts[kind]
        if ps:
            now = top_tokens(model, tok, ps, eval_batch_size)
            same = [int(a == b) for a, b in zip(now, reference[kind])]
            out["retained"][kind] = same
            out[f"retention_{kind}"] = 100.0 * sum(same) / len(ps)
    out["perplexity"] = perplexity(model, windows)
    weights = {n: weight_stats(w0, model.get_parameter(n)) for n, w0 in originals.items()}
    out["weights"] = weights
    out["delta_fro"] = math.sqrt(sum(v["delta_fro"] ** 2 for v in weights.values())) if weights else 0.0
    out["delta_sigma_max"] = max((v["delta_sigma_max"] for v in weights.values()), default=0.0)
    out["cond_max"] = max((v["cond"] for v in weights.values()), default=None)
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _edited_weight_names(model, hp) -> list[str]:
    """The weights the shared editor (PMET, MEMIT, their variants) or ROME changes, known before the first
    edit so that round 0 reports ``cond(W_0)``; other editors' weights are learnt from their first round."""
    from .editing.hparams import EditHparams
    from .editing.rome import RomeHparams

    layout = model.layout
    if isinstance(hp, RomeHparams):
        layer = hp.layer if hp.layer is not None else layout.critical_layers[0]
        return [layout.weight_name("mlp_out", layer)]
    if not isinstance(hp, EditHparams):
        return []
    layers = hp.layers if hp.layers is not None else layout.critical_layers
    comps = (["attn_out"] if hp.update_attn_weights else []) + ["mlp_out"]
    return [layout.weight_name(c, l) for l in sorted(layers) for c in comps]


def run_sequential(
    model,
    tok,
    method: str,
    rounds: int,
    batch: int,
    dataset: str = "counterfact",
    seed: int = 0,
    hparams=None,
    overrides: dict | None = None,
    n_retention: int = 50,
    n_known: int = 50,
    ppl_tokens: int = 4096,
    runs_dir: str | Path | None = None,
    cache: str | Path | None = None,
    eval_batch_size: int = 32,
    progress: bool = True,
    committed: str | Path | None = None,
) -> list[dict]:
    """``rounds`` rounds of ``batch`` edits with ``method`` on the already edited model (module docstring);
    returns one dict per round, round 0 (unedited) first. The model is left unedited afterwards.

    ``hparams``/``overrides`` as :func:`pmet.experiments.run_edit_eval`. The edited records are the first
    ``rounds * batch`` of the table's seeded permutation (:func:`pmet.experiments.table_records`), round
    ``t`` (1-based) edits records ``(t-1)*b .. t*b - 1``. Only CounterFact is supported. ``method``: any
    registered editor (ROME applies each round's requests one after another, as it always does).

    ``committed``: a folder holding ``results/`` (e.g. the repository). If it has the committed file of exactly
    this run (:func:`sequential_results_path`; same ``rounds`` and a specification equal in every field), the
    run is read from it (:func:`load_sequential_run`, printed) instead of edited and measured again.
    """
    from .editing import edit, get_editor
    from .models import model_fingerprint
    from .tensor_cache import load_entry, save_entry

    if dataset != "counterfact":
        raise ValueError(f"sequential runs score CounterFact records; dataset {dataset!r} is not supported")
    if rounds < 1 or batch < 1:
        raise ValueError(f"rounds and batch must be >= 1, got rounds={rounds}, batch={batch}")
    get_editor(method)  # an unknown method is one clear error
    pool_records, pool = table_selection(dataset, None, seed)
    pool_size = len(pool_records)
    if rounds * batch + n_retention > pool_size:
        raise ValueError(
            f"{rounds} rounds x {batch} edits + {n_retention} held-out records need "
            f"{rounds * batch + n_retention} CounterFact records; the table pool has {pool_size}"
        )
    hp = hparams or method_hparams(method, model, dataset, overrides)
    ns = bool(getattr(hp, "null_space", False))
    name = getattr(model, "pmet_name", "model")
    runs_dir = Path(runs_dir) if runs_dir is not None else cache_dir() / "runs"
    hp_id = _hparams_id(hp) + _artifact_id(method, model, hp, cache)
    out = (
        runs_dir
        / name
        / dataset
        / "sequential"
        / method
        / f"b{batch}_seed{seed}_hp{hp_id}_ret{n_retention}_known{n_known}_ppl{ppl_tokens}"
    )
    records = table_records(dataset, rounds * batch, seed)
    fp0 = model_fingerprint(model)
    originals = {n: model.get_parameter(n).detach().clone() for n in _edited_weight_names(model, hp)}
    key = json.dumps({"v": FORMAT_VERSION, "model": fp0, "hp": hp_id, "batch": batch, "seed": seed})
    spec = _run_spec(name, dataset, method, batch, seed, hp, hp_id, overrides, pool, n_retention, n_known, ppl_tokens)
    if committed is not None:
        stored = _committed_run(committed, spec, rounds, batch)
        if stored is not None:
            if progress:
                print(f"{method}: read from the committed run {shown(stored, committed)} (same specification)")
            return load_sequential_run(stored)

    with run_lock(out), contextlib.ExitStack() as restore:
        restore.callback(_put_back, model, originals)
        out.mkdir(parents=True, exist_ok=True)
        prompts = _retention_prompts(dataset, n_retention, n_known, seed)
        windows = corpus_windows(tok, ppl_tokens)
        first_ids = {r.case_id for r in records[:batch]}
        ref_path = out / "reference.json"
        if ref_path.exists():
            reference = json.loads(ref_path.read_text())
        else:  # on the unedited model
            reference = {k: top_tokens(model, tok, prompts[k], eval_batch_size) for k in ("neighborhood", "known")}
            _write_json(ref_path, {**reference, "held_out_ids": prompts["held_out_ids"], "model": name})
        results = []
        for t in range(rounds + 1):
            p = out / f"round_{t:03d}.json"
            if not p.exists():
                break
            row = json.loads(p.read_text())
            if (row.get("spec") or {}).get("format") != FORMAT_VERSION:
                break  # written in an earlier format: measured again
            results.append(row)
        done = len(results) - 1  # rounds finished (-1: not even round 0)
        if done >= rounds:
            return results[: rounds + 1]
        prior: dict[str, torch.Tensor] = {}
        if done >= 1:
            hit = load_entry(out / f"weights_{done:03d}.safetensors", key)
            if hit is None or hit[1].get("round") != done:
                results, done = results[:1], 0  # weights of the last round missing: start the edits again
            else:
                tensors = hit[0]
                with torch.no_grad():
                    for n, w in tensors.items():
                        if n.startswith("prior::"):
                            continue
                        p_ = model.get_parameter(n)
                        originals.setdefault(n, p_.detach().clone())
                        p_.copy_(w.to(p_.device, p_.dtype))
                prior = {n.removeprefix("prior::"): v for n, v in tensors.items() if n.startswith("prior::")}
        if done < 0:
            r0 = _measure(model, tok, [], prompts, reference, windows, originals, first_ids, eval_batch_size)
            r0.update(
                round=0,
                n_edits=0,
                method=method,
                model=name,
                batch=batch,
                seed=seed,
                hparams=hp_id,
                edit_seconds=0.0,
                eval_seconds=0.0,
                new_ids=[],
                spec=spec,
            )
            _write_json(out / "round_000.json", r0)
            results, done = [r0], 0
        bar = tqdm(
            total=rounds,
            initial=min(done, rounds),
            desc=f"{method}: sequential rounds of {batch}",
            unit="round",
            disable=not progress,
        )
        for t in range(done + 1, rounds + 1):
            chunk = records[(t - 1) * batch : t * batch]
            t0 = time.perf_counter()
            options = {"prior_keys": dict(prior) or None} if ns else {}
            result = edit(
                model,
                tok,
                [r.as_request() for r in chunk],
                method=method,
                hparams=hp,
                cache_dir=cache,
                progress=False,
                **options,
            )
            for n, w0 in result._originals.items():  # weights first changed in this round (W_0 before it)
                originals.setdefault(n, w0.detach().clone())
            if ns:
                for n, K in result.keys.items():
                    g = K.double().T @ K.double()
                    prior[n] = prior[n] + g if n in prior else g
            t1 = time.perf_counter()
            if model_fingerprint(model) != fp0:
                raise RuntimeError(
                    f"the fingerprint of {name} changed after an edit (it reads an edited weight): "
                    "later rounds would load statistics of the edited model; not supported"
                )
            row = _measure(
                model, tok, records[: t * batch], prompts, reference, windows, originals, first_ids, eval_batch_size
            )
            row.update(
                round=t,
                n_edits=t * batch,
                method=method,
                model=name,
                batch=batch,
                seed=seed,
                hparams=hp_id,
                edit_seconds=t1 - t0,
                eval_seconds=time.perf_counter() - t1,
                new_ids=[r.case_id for r in chunk],
                spec=spec,
            )
            tensors = {n: model.get_parameter(n).detach() for n in originals}
            tensors.update({f"prior::{n}": g for n, g in prior.items()})
            save_entry(out / f"weights_{t:03d}.safetensors", tensors, key, {"round": t})
            _write_json(out / f"round_{t:03d}.json", row)
            (out / f"weights_{t - 1:03d}.safetensors").unlink(missing_ok=True)
            results.append(row)
            bar.update(1)
            bar.set_postfix(efficacy=f"{row['efficacy']:.0f}", ppl=f"{row['perplexity']:.1f}")
        bar.close()
    return results


def _run_spec(name, dataset, method, batch, seed, hp, hp_id, overrides, pool, n_retention, n_known, ppl_tokens):
    """What a sequential run is (every round records it; the committed file's spec is this plus its length):
    JSON data, so a round read back from its file equals the round as measured."""
    spec = {
        "kind": "sequential",
        "format": FORMAT_VERSION,
        "model": name,
        "dataset": dataset,
        "method": method,
        "batch": batch,
        "seed": seed,
        "pool": pool,
        "hparams_id": hp_id,
        "hparams_values": hp.to_dict() if hasattr(hp, "to_dict") else None,
        "value_autocast": getattr(hp, "v_autocast", None) or None,
        # the overrides this method has (method_hparams drops the others, e.g. v_fast for ROME)
        "overrides": {
            k: v for k, v in (overrides or {}).items() if v is not None and k != "v_autocast" and _has_field(hp, k)
        },
        "n_retention": n_retention,
        "n_known": n_known,
        "ppl_tokens": ppl_tokens,
    }
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


def _put_back(model, originals: dict) -> None:
    with torch.no_grad():
        for n, w0 in originals.items():
            model.get_parameter(n).copy_(w0)


_DETAIL = ("records", "weights", "retained", "new_ids", "spec")  # a round's fields that are not one number


def sequential_frame(runs) -> pd.DataFrame:
    """One row per (method, round) from :func:`run_sequential` results (a list, or ``{method: list}``):
    the scalar metrics, without the per-record and per-weight detail."""
    import pandas as pd

    lists = runs.values() if isinstance(runs, dict) else [runs]
    rows = [{k: v for k, v in r.items() if k not in _DETAIL} for rs in lists for r in rs]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the committed result file
def sequential_results_path(root: str | Path, spec: dict) -> Path:
    """Where a sequential run's committed file goes: ``<root>/results/<model>/sequential/<method>_r<T>x<b>_seed<s>_
    hp<hparams id>[_ret<n>_known<n>_ppl<n>][_full].jsonl.gz`` (``spec``: a file's spec, with ``rounds``; the
    measurement sizes are named only where they differ from :func:`run_sequential`'s defaults, so two runs that
    measured differently never share a file)."""
    from .runstore import SUFFIX

    full = "_full" if spec.get("pool") == "full" else ""
    sizes = (spec.get("n_retention", 50), spec.get("n_known", 50), spec.get("ppl_tokens", 4096))
    measured = "" if sizes == (50, 50, 4096) else "_ret{}_known{}_ppl{}".format(*sizes)
    name = (
        f"{spec['method']}_r{spec['rounds']}x{spec['batch']}_seed{spec['seed']}_hp{spec['hparams_id']}{measured}{full}"
    )
    return Path(root) / "results" / spec["model"] / "sequential" / f"{name}{SUFFIX}"


def save_sequential_run(rows: list[dict], out_dir: str | Path) -> Path:
    """Write one :func:`run_sequential` result (its rounds, round 0 first) as a committed run file
    (:mod:`pmet.runstore`, path :func:`sequential_results_path`), so :mod:`pmet.claims` reads it without a model:

    * spec: the run's (every round records it; ``"kind": "sequential"``) plus ``rounds`` and ``n_edits`` of its
      last round;
    * summary: the last round's numbers, ``rounds`` (every round's numbers and per-weight statistics, round 0
      first) and ``retained`` (``{"neighborhood": [...], "known": [...]}``: per retention prompt, in a fixed order
      given by the seed, 1 if its top-1 token after the last round is still the unedited model's);
    * rows: one per edited record, in edit order: ``case_id``, the ``round`` that edited it, and its
      ``efficacy`` / ``generalization`` / ``specificity`` after the last round.
    """
    from .runstore import write_run

    last = rows[-1]
    spec = dict(last.get("spec") or {})
    if spec.get("format") != FORMAT_VERSION:
        raise ValueError("these rounds record no run specification (an earlier format): run them again")
    if int(last["round"]) < 1:
        raise ValueError("a sequential run with no finished round has nothing to save")
    spec = _file_spec(spec, last["round"], last["n_edits"])
    scores = last.get("records") or {}
    parts = ("efficacy", "generalization", "specificity")
    out_rows = [
        {"case_id": cid, "round": int(r["round"]), **dict(zip(parts, scores.get(str(cid), [None] * 3)))}
        for r in rows[1:]
        for cid in r.get("new_ids") or []
    ]
    summary = {k: v for k, v in last.items() if k not in _DETAIL}
    summary["rounds"] = [{k: v for k, v in r.items() if k not in _DETAIL or k == "weights"} for r in rows]
    summary["retained"] = last.get("retained") or {}
    return write_run(sequential_results_path(out_dir, spec), spec, summary, out_rows)


def _file_spec(spec: dict, rounds: int, n_edits: int) -> dict:
    """A committed file's spec: the rounds' spec plus the run's length (:func:`save_sequential_run`)."""
    from .runstore import finite as _finite

    return _finite({**spec, "rounds": int(rounds), "n_edits": int(n_edits), "generation": False})


def _committed_run(root: str | Path, spec: dict, rounds: int, batch: int) -> Path | None:
    """The committed file of the run ``spec`` with ``rounds`` rounds under ``root``, if it holds exactly that run."""
    from .runstore import read_run

    want = _file_spec(spec, rounds, rounds * batch)
    path = sequential_results_path(root, want)
    return path if path.exists() and read_run(path).spec == want else None


def load_sequential_run(path: str | Path) -> list[dict]:
    """The rounds of a committed sequential run file, round 0 first, as :func:`run_sequential` returned them
    (the inverse of :func:`save_sequential_run`: saving them again writes the same bytes). Every round has its
    numbers, per-weight statistics, edited case ids and spec; the file keeps the per-record values
    (``records``) and per-prompt retention (``retained``) of the last round only, so only the last round has
    them -- all that :func:`sequential_frame`, :func:`sequential_claims` and :func:`plot_sequential` read."""
    from .runstore import read_run

    run = read_run(path)
    spec = {k: v for k, v in run.spec.items() if k not in ("rounds", "n_edits", "generation")}
    parts = ("efficacy", "generalization", "specificity")
    rounds = [dict(r) for r in run.summary["rounds"]]
    for r in rounds:
        r["new_ids"] = [row["case_id"] for row in run.rows if row["round"] == r["round"]]
        r["spec"] = dict(spec)
    rounds[-1]["records"] = {str(row["case_id"]): [row.get(k) for k in parts] for row in run.rows}
    rounds[-1]["retained"] = run.summary.get("retained") or {}
    return rounds


def save_sequential_runs(runs: dict[str, list[dict]], out_dir: str | Path) -> list[Path]:
    """:func:`save_sequential_run` for every method of ``{method: run_sequential(...)}``."""
    return [save_sequential_run(rows, out_dir) for rows in runs.values()]


# ------------------------------------------------------------------------------------- reading the runs
def collapse_point(rows: list[dict], ppl_factor: float = 2.0, efficacy_floor: float = 50.0) -> int | None:
    """The number of edits after which a sequential run has *collapsed*: the first round whose perplexity
    exceeds ``ppl_factor`` x the unedited model's, or whose efficacy over all past edits falls below
    ``efficacy_floor`` percent; None if no round of the run does (the threshold is ours, stated with every
    claim that uses it)."""
    ppl0 = rows[0]["perplexity"]
    for r in rows[1:]:
        if r["perplexity"] > ppl_factor * ppl0 or (r.get("efficacy") is not None and r["efficacy"] < efficacy_floor):
            return r["n_edits"]
    return None


def _paired_last_round(a: list[dict], b: list[dict], metric: int = 0) -> dict:
    """Paired permutation test of the per-record efficacy (``metric`` 0; 1: generalization) of the same edits
    after the last round both runs have."""
    from .evaluation.stats import paired_test

    t = min(len(a), len(b)) - 1
    ra, rb = a[t].get("records", {}), b[t].get("records", {})
    ids = sorted(set(ra) & set(rb))
    return {"n_edits": a[t]["n_edits"], **paired_test([ra[i][metric] for i in ids], [rb[i][metric] for i in ids])}


def _when(n: int | None, rows: list[dict]) -> str:
    return f"{n} edits" if n is not None else f"none within {rows[-1]['n_edits']} edits"


def sequential_claims(runs: dict[str, list[dict]], ppl_factor: float = 2.0, efficacy_floor: float = 50.0) -> list[str]:
    """The notebook's claims as sentences computed from the runs (``{method: run_sequential(...)}``): when each
    method collapses (:func:`collapse_point`), whether PMET collapses earlier or later than MEMIT, and whether
    the null-space projection delays it, with a paired test of the last round's per-record efficacy of the
    same edits."""
    rule = f"perplexity > {ppl_factor:g}x the unedited model's or efficacy of past edits < {efficacy_floor:g}%"
    cp = {m: collapse_point(rs, ppl_factor, efficacy_floor) for m, rs in runs.items()}
    out = [f"Collapse rule: {rule}."]
    for m, rs in runs.items():
        last = rs[-1]
        when = (
            f"collapses after {cp[m]} edits"
            if cp[m] is not None
            else f"does not collapse within {last['n_edits']} edits"
        )
        out.append(
            f"{m}: {when}; after {last['n_edits']} edits efficacy "
            f"{last['efficacy']:.1f}%, retention (neighbourhood) {last.get('retention_neighborhood', 0):.1f}%, "
            f"perplexity {last['perplexity']:.2f} (unedited {rs[0]['perplexity']:.2f}), "
            f"total ||dW||_F {last['delta_fro']:.3g}."
        )

    def order(a: str, b: str) -> str:
        na, nb = cp[a], cp[b]
        if na is None and nb is None:
            return f"neither {a} nor {b} collapses within the run"
        if na == nb:
            return f"{a} and {b} collapse at the same round ({na} edits)"
        if nb is None or (na is not None and na < nb):
            return f"{a} collapses earlier than {b} ({na} edits vs {_when(nb, runs[b])})"
        return f"{a} collapses later than {b} ({_when(na, runs[a])} vs {nb} edits)"

    def test(a: str, b: str) -> str:
        t = _paired_last_round(runs[a], runs[b])
        return (
            f"efficacy of the same {t['n']} edits after {t['n_edits']}: {100 * t['mean_a']:.1f}% vs "
            f"{100 * t['mean_b']:.1f}% (paired permutation test p = {t['pvalue']:.3g})"
        )

    for a, b in (("pmet", "memit"), ("pmet-ns", "pmet"), ("memit-ns", "memit")):
        if a in runs and b in runs:
            out.append(f"{order(a, b)}; {test(a, b)}.")
    return out


def plot_sequential(frame, title: str = ""):
    """Four panels against the number of edits, one line per method: efficacy of all past edits, retention
    of the neighbourhood prompts, perplexity, and the total ``‖ΔW‖_F``."""
    import matplotlib.pyplot as plt

    panels = [
        ("efficacy", "efficacy of all past edits (%)"),
        ("retention_neighborhood", "retention (%)"),
        ("perplexity", "WikiText-2 perplexity"),
        ("delta_fro", "total ‖ΔW‖_F"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (col, label) in zip(axes, panels):
        for method, g in frame.groupby("method", sort=False):
            ax.plot(g["n_edits"], g[col], marker="o", ms=3, label=method)
        ax.set_xlabel("edits so far")
        ax.set_ylabel(label)
        if col in ("perplexity", "delta_fro"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def null_space_dims(model, tok, hp, cache: str | Path | None = None) -> dict[str, tuple[int, int]]:
    """``{weight name: (null-space dimension, key dimension)}`` that ``hp``'s threshold gives on this model's
    key statistics (loaded from, or written to, the statistics cache): 0 means the projection lets no update
    through, the full dimension means it preserves nothing."""
    from .editing.core import null_space_projector
    from .editing.editor import key_statistics

    layout = model.layout
    layers = sorted(hp.layers if hp.layers is not None else layout.critical_layers)
    out = {}
    for comp, mom2 in key_statistics(model, tok, hp, layers, cache_dir=cache, progress=False).items():
        for l in layers:
            P = null_space_projector(mom2[l], hp.null_space_threshold)
            out[layout.weight_name(comp, l)] = (round(float(P.trace())), P.shape[0])
    return out
