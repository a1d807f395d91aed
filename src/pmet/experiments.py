"""Mass-editing experiments: choose records, edit, evaluate, summarise -- with every step cached.

This is the glue the table and figure notebooks call; it holds no algorithm of its own. One run is
``(model, dataset, method, n_edits, seed)``: the first ``n_edits`` records of a seeded permutation of the
dataset's table records are edited at once (one call of the editor, as the paper's mass edits), the
edited model is evaluated on the same records, the weights are restored. Per-record results go to JSON
Lines under ``runs_dir`` (default ``$PMET_CACHE_DIR/runs``) and the summary to a JSON beside them, so a
second call returns at once and an interrupted evaluation resumes. Value vectors and key statistics are
cached by the editor itself, so the points of a sweep share them.

Record choice: CounterFact tables use the 1,653 full-field records *minus* those whose case id is in
the ``counterfact-val`` split (hyperparameters are tuned on that split only); above that size the
reduced-format ``counterfact-edit`` requests are added. zsRE tables use the 1,037-record eval subset.
Nested permutations mean that a smaller run edits a prefix of a larger run's records.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import torch

from .editing.editor import MethodUnavailable  # noqa: F401  (re-exported for notebooks)
from .paths import cache_dir

UNEDITED = "none"


def table_records(dataset: str, n: int | None = None, seed: int = 0, full_fields_only: bool = True) -> list:
    """The records a table edits and evaluates (see module docstring); ``n=None`` means all of them."""
    from .data import load_counterfact, load_zsre

    if dataset == "counterfact":
        val_ids = {r.case_id for r in load_counterfact("val")}
        pool = [r for r in load_counterfact("full") if r.case_id not in val_ids]
        if not full_fields_only and (n is None or n > len(pool)):
            have = {r.case_id for r in pool}
            pool += [r for r in load_counterfact("edit") if r.case_id not in have and r.case_id not in val_ids]
    elif dataset == "zsre":
        pool = load_zsre("eval")
    else:
        raise ValueError(f"dataset must be 'counterfact' or 'zsre', not {dataset!r}")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if n is not None and n > len(pool):
        raise ValueError(f"{dataset}: asked for {n} records, only {len(pool)} available "
                         f"(full_fields_only={full_fields_only})")
    return [pool[i] for i in order[: n if n is not None else len(pool)]]


def _hparams_id(hp) -> str:
    if hp is None:
        return "none"
    d = hp.to_dict() if hasattr(hp, "to_dict") else dict(vars(hp))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _artifact_id(method: str, model, hp, cache=None) -> str:
    """Identity of what an editor loads besides its hyperparameters (MEND's trained hypernetwork), so a
    retrained editor never reuses the cached run of an earlier one."""
    if method != "mend":
        return ""
    from .editing.mend import editor_dir

    path = editor_dir(model, hp, cache) / "editor.safetensors"
    return "_ed" + hashlib.sha256(path.read_bytes()).hexdigest()[:8] if path.exists() else ""


def run_dir(runs_dir: Path, model_name: str, dataset: str, method: str, n: int, seed: int, hp_id: str,
            generation: bool) -> Path:
    tag = f"n{n}_seed{seed}_hp{hp_id}" + ("_gen" if generation else "")
    return runs_dir / model_name / dataset / method / tag


def run_edit_eval(
    model,
    tok,
    method: str,
    dataset: str = "counterfact",
    n_edits: int = 100,
    seed: int = 0,
    generation: bool = False,
    hparams=None,
    runs_dir: str | Path | None = None,
    cache: str | Path | None = None,
    eval_batch_size: int = 32,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Edit ``n_edits`` records with ``method`` (``"none"`` = unedited), evaluate, restore; return the summary.

    ``hparams``: used as given; otherwise the model's hyperparameter file for ``method`` and ``dataset`` with
    ``overrides`` applied (e.g. ``{"v_autocast": "bfloat16"}``; entries that are None are ignored). Either
    way the hyperparameters enter the run's cache folder, so differently configured runs never mix.

    The summary holds the metrics in percent with 95% CIs (normal approximation) and their n's, the
    editor's timings, and ``delta_norms`` (Frobenius norm of Δ per edited weight, for Fig. 4).
    """
    from .editing import edit, hparams_for

    records = table_records(dataset, n_edits, seed)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    hp = None if method == UNEDITED else (hparams or hparams_for(method, model, dataset, **overrides))
    out, meta = _run_location(model, method, dataset, len(records), seed, hp, generation, runs_dir, cache)
    summary_path = out / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())

    t0 = time.perf_counter()
    result = None
    if method != UNEDITED:
        requests = [r.as_request() for r in records]
        result = edit(model, tok, requests, method=method, hparams=hp, cache_dir=cache, progress=progress)
    t_edit = time.perf_counter() - t0
    try:
        return _evaluate_and_save(model, tok, records, dataset, out, meta, generation, eval_batch_size, progress,
                                  t_edit, result, hp)
    finally:
        if result is not None:
            result.restore()


def _run_location(model, method, dataset, n, seed, hp, generation, runs_dir, cache) -> tuple[Path, dict]:
    runs_dir = Path(runs_dir) if runs_dir is not None else cache_dir() / "runs"
    name = getattr(model, "pmet_name", "model")
    hp_id = _hparams_id(hp) + _artifact_id(method, model, hp, cache)
    out = run_dir(runs_dir, name, dataset, method, n, seed, hp_id, generation)
    return out, {"model": name, "method": method, "n_edits": n, "seed": seed, "hparams": hp_id}


def _evaluate_and_save(model, tok, records, dataset, out: Path, meta: dict, generation: bool, eval_batch_size: int,
                       progress: bool, t_edit: float, result=None, hp=None) -> dict:
    """Evaluate the (edited) model on ``records``, write ``records.jsonl`` + ``summary.json``; the summary."""
    from .evaluation import evaluate_counterfact, evaluate_zsre, summarize_counterfact, summarize_zsre

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if dataset == "counterfact":
        rows = evaluate_counterfact(model, tok, records, batch_size=eval_batch_size, generation=generation,
                                    out_path=out / "records.jsonl", progress=progress, meta=meta)
        summary = summarize_counterfact(rows)
    else:
        rows = evaluate_zsre(model, tok, records, batch_size=eval_batch_size, out_path=out / "records.jsonl",
                             progress=progress, meta=meta)
        summary = summarize_zsre(rows)
    summary.update(meta)
    summary["edit_seconds"] = t_edit
    summary["eval_seconds"] = time.perf_counter() - t0
    if result is not None:
        summary["timings"] = dict(getattr(result, "timings", {}))
        summary["delta_norms"] = {k: float(torch.linalg.norm(v.float())) for k, v in result.deltas.items()}
        summary["hparams_values"] = hp.to_dict() if hasattr(hp, "to_dict") else None
    summary["device"] = str(next(model.parameters()).device)
    summary["torch"] = torch.__version__
    summary_path = out / "summary.json"
    tmp = summary_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    os.replace(tmp, summary_path)
    return summary


SEQUENTIAL = ("rome",)  # editors that apply the requests one after another


def run_sweep(model, tok, method: str, sizes, dataset: str = "counterfact", seed: int = 0,
              generation: bool = False, runs_dir=None, cache=None, eval_batch_size: int = 32,
              progress: bool = True) -> dict[int, dict]:
    """:func:`run_edit_eval` at every size of ``sizes`` (Fig. 3); ``{n: summary}``.

    For a sequential editor (ROME) the run with ``n`` edits is, step for step, the first ``n`` steps of
    the run with ``max(sizes)`` edits (the records of a smaller run are a prefix of a larger run's, and
    each step depends only on the earlier ones). So the largest run is made once and the model is
    evaluated when it has applied ``n`` edits, for every missing ``n``: the cost of one ROME run instead of
    one per point. The summaries land where :func:`run_edit_eval` would put them, and are the same.
    """
    sizes = sorted(set(int(n) for n in sizes))
    if method not in SEQUENTIAL:
        return {n: run_edit_eval(model, tok, method, dataset, n, seed, generation, runs_dir=runs_dir, cache=cache,
                                 eval_batch_size=eval_batch_size, progress=progress) for n in sizes}
    from .editing import edit, hparams_for

    hp = hparams_for(method, model, dataset)
    records = table_records(dataset, sizes[-1], seed)
    where = {n: _run_location(model, method, dataset, n, seed, hp, generation, runs_dir, cache) for n in sizes}
    out = {n: json.loads((loc / "summary.json").read_text()) for n, (loc, _) in where.items()
           if (loc / "summary.json").exists()}
    missing = [n for n in sizes if n not in out]
    if not missing:
        return out
    t0, evaluating = time.perf_counter(), [0.0]  # editing time excludes the evaluations made on the way

    def at_step(k: int, current) -> None:  # called by the editor after its k-th edit
        if k not in missing:
            return
        t1 = time.perf_counter()
        loc, meta = where[k]
        out[k] = _evaluate_and_save(model, tok, records[:k], dataset, loc, meta, generation, eval_batch_size,
                                    progress, t1 - t0 - evaluating[0], current, hp)
        evaluating[0] += time.perf_counter() - t1

    result = edit(model, tok, [r.as_request() for r in records[:max(missing)]], method=method, hparams=hp,
                  cache_dir=cache, progress=progress, on_step=at_step)
    result.restore()
    return {n: out[n] for n in sizes}


PAPER_SIZES = {"gptj": 10_000, "neox": 10_000}


def resolve_n_edits(model_name: str, n_edits: int | dict | None, default: int) -> int:
    """``n_edits`` if given (an int, or a ``{model: n}`` dict for a per-model size, e.g. when a second
    model's block of Table 1 has to be smaller on a CPU); else the paper's 10,000 for its models (gptj,
    neox); else ``default``."""
    if isinstance(n_edits, dict):
        n_edits = n_edits.get(model_name)
    if n_edits is not None:
        return int(n_edits)
    return PAPER_SIZES.get(model_name, default)


def run_grid(model_names, methods, dataset: str = "counterfact", n_edits: int | None = None, default_n: int = 1000,
             seed: int = 0, generation: bool = False, device: str = "cpu", runs_dir=None, progress: bool = True,
             **kwargs) -> dict:
    """Run :func:`run_edit_eval` for every (model, method); returns ``{model: {method: summary}}``.

    ``methods`` is a list, or a ``{model: [methods]}`` dict when the blocks differ (e.g. a second model
    without a trained MEND); ``n_edits`` an int or a ``{model: n}`` dict (:func:`resolve_n_edits`).

    A method that cannot run here records ``{"unavailable": reason}`` instead of a summary, so a table
    shows why a row is missing rather than silently dropping it.
    """
    from .models import load_model

    out: dict = {}
    for name in model_names:
        model, tok = load_model(name, device=device)
        n = resolve_n_edits(name, n_edits, default_n)
        out[name] = {}
        for method in (methods.get(name, []) if isinstance(methods, dict) else methods):
            try:
                out[name][method] = run_edit_eval(model, tok, method, dataset, n, seed, generation,
                                                  runs_dir=runs_dir, progress=progress, **kwargs)
            except MethodUnavailable as exc:
                out[name][method] = {"unavailable": str(exc), "method": method, "model": name, "n_edits": n}
        del model
    return out
