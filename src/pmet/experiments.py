"""Mass-editing experiments: choose records, edit, evaluate, summarise -- with every step cached.

This is the glue the table and figure notebooks call; it holds no algorithm of its own. One run is
``(model, dataset, method, n_edits, seed)``: the first ``n_edits`` records of a seeded permutation of the
dataset's table records are edited at once (one call of the editor, as the paper's mass edits), the
edited model is evaluated on the same records, the weights are restored. Per-record results go to JSON
Lines under ``runs_dir`` (default ``$PMET_CACHE_DIR/runs``) and the summary to a JSON beside them, so a
second call returns at once and an interrupted evaluation resumes. Value vectors and key statistics are
cached by the editor itself, so the points of a sweep share them. A run holds an exclusive lock on its
folder (ROME's sweep: on its trajectory) while it edits and evaluates, so two processes asking for the same
run (two notebooks, or parallel workers, on one cache) do it once: the second waits, then reads the summary.

Record choice: CounterFact tables use the 1,653 full-field records *minus* those whose case id is in
the ``counterfact-val`` split (hyperparameters are tuned on that split only). zsRE tables use the
1,037-record eval subset. Where ROME's complete files are in the data folder (``counterfact.json``, 21,919
records; ``zsre_mem_eval.json``, 19,086), for the paper's models (gptj, neox), and for any run larger than
the subset, the pool is the complete file instead (downloaded and checksummed when missing), again minus the
val ids (:func:`table_selection`); such runs are kept apart in the cache (``_full`` in the run folder name).
Nested permutations mean that a smaller run edits a prefix of a larger run's records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .editing import UNEDITED, MethodUnavailable, get_editor, load_hparams, sequential_methods
from .paths import cache_dir


@contextlib.contextmanager
def run_lock(path: Path):
    """Hold an exclusive advisory lock on ``<path>.lock`` (``fcntl.flock``; waits while another process
    holds it). Without it, two processes running the same run appended each record twice to one
    ``records.jsonl`` and both edited. Where ``fcntl`` is missing (Windows) it is a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


POOL_SUBSET, POOL_FULL = "subset", "full"
COMPLETE_FILES = {"counterfact": "counterfact.json", "zsre": "zsre_mem_eval.json"}  # the paper's complete sets


def _pool_kind(dataset: str, n: int | None, subset_size: int, full: bool | None) -> str:
    """Which pool a table draws from: the complete file (:data:`COMPLETE_FILES`) when ``full`` is True
    (downloaded if missing; an error with its URL if that fails), when it is present in the data folder
    (``full=None``), or when ``n`` exceeds the subset (then downloaded as for True); else the subset."""
    from .data import ensure_file

    if full is False:
        return POOL_SUBSET
    rel = COMPLETE_FILES[dataset]
    if full is None:
        try:
            ensure_file(rel, download=False)
            return POOL_FULL
        except FileNotFoundError:
            if n is None or n <= subset_size:
                return POOL_SUBSET
    ensure_file(rel)  # DataNotFoundError: one line with the URL and what to do
    return POOL_FULL


def table_selection(dataset: str, n: int | None = None, seed: int = 0, full_fields_only: bool = True,
                    full: bool | None = None) -> tuple[list, str]:
    """``(records, pool)``: the records a table edits and evaluates (module docstring) and the pool they come
    from, ``"subset"`` or ``"full"`` (see :func:`_pool_kind`). The full CounterFact pool is ROME's complete
    ``counterfact.json`` (21,919 records) minus the ``counterfact-val`` case ids; the full zsRE pool is
    ``zsre_mem_eval.json`` (19,086). ``n=None`` means all of them."""
    from .data import load_counterfact, load_zsre

    if dataset == "counterfact":
        val_ids = {r.case_id for r in load_counterfact("val")}
        subset = [] if full else [r for r in load_counterfact("full") if r.case_id not in val_ids]
        kind = _pool_kind(dataset, n, len(subset), full if (full_fields_only or full) else False)
        if kind == POOL_FULL:
            pool = [r for r in load_counterfact("original") if r.case_id not in val_ids]
        else:
            pool = subset
            if not full_fields_only and (n is None or n > len(pool)):
                have = {r.case_id for r in pool}
                pool += [r for r in load_counterfact("edit") if r.case_id not in have and r.case_id not in val_ids]
    elif dataset == "zsre":
        subset = [] if full else load_zsre("eval")
        kind = _pool_kind(dataset, n, len(subset), full)
        pool = load_zsre("mem_eval") if kind == POOL_FULL else subset
    else:
        raise ValueError(f"dataset must be 'counterfact' or 'zsre', not {dataset!r}")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if n is not None and n > len(pool):
        raise ValueError(f"{dataset}: asked for {n} records, only {len(pool)} available "
                         f"({kind} pool, full_fields_only={full_fields_only})")
    return [pool[i] for i in order[: n if n is not None else len(pool)]], kind


def table_records(dataset: str, n: int | None = None, seed: int = 0, full_fields_only: bool = True,
                  full: bool | None = None) -> list:
    """The records a table edits and evaluates (see :func:`table_selection`); ``n=None`` means all of them."""
    return table_selection(dataset, n, seed, full_fields_only, full)[0]


def paper_pool(model) -> bool | None:
    """``True`` (the complete data files) for the paper's models (gptj, neox), else ``None`` (auto)."""
    return True if getattr(model, "pmet_name", model) in PAPER_SIZES else None


def table_pool_ids(dataset: str) -> set:
    """Every record any table can edit (the union of :func:`table_records`' pools at every size): CounterFact
    case ids (full-field records outside ``counterfact-val`` and reduced ``counterfact-edit`` records outside
    it), zsRE questions (``src``) of the eval subset. MEND's training excludes these
    (:func:`pmet.editing.mend.training_examples`)."""
    from .data import load_counterfact, load_zsre

    if dataset == "counterfact":
        val_ids = {r.case_id for r in load_counterfact("val")}
        return ({r.case_id for r in load_counterfact("full")} | {r.case_id for r in load_counterfact("edit")}) - val_ids
    if dataset == "zsre":
        return {r.src for r in load_zsre("eval")}
    raise ValueError(f"dataset must be 'counterfact' or 'zsre', not {dataset!r}")


def _hparams_id(hp) -> str:
    if hp is None:
        return "none"
    d = hp.to_dict() if hasattr(hp, "to_dict") else dict(vars(hp))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _artifact_id(method: str, model, hp, cache=None) -> str:
    """Identity of what an editor loads besides its hyperparameters (MEND's trained hypernetwork: the
    registry's ``artifact_id`` hook), so a retrained editor never reuses the cached run of an earlier one."""
    if method == UNEDITED:
        return ""
    hook = get_editor(method).artifact_id
    return hook(model, hp, cache) if hook is not None else ""


def run_dir(runs_dir: Path, model_name: str, dataset: str, method: str, n: int, seed: int, hp_id: str,
            generation: bool, pool: str = POOL_SUBSET) -> Path:
    tag = f"n{n}_seed{seed}_hp{hp_id}" + ("_gen" if generation else "") + ("_full" if pool == POOL_FULL else "")
    return runs_dir / model_name / dataset / method / tag


def method_hparams(method: str, model, dataset: str, overrides: dict | None = None):
    """The hyperparameters of ``method`` for ``model``/``dataset`` with those ``overrides`` the method has
    (e.g. ``v_autocast`` reaches ROME, MEMIT and PMET, which optimise value vectors, not FT-W or MEND: the
    loader's ``only_where_present``; a name no editor has still raises); entries that are None are ignored.
    None for the unedited model."""
    if method == UNEDITED:
        return None
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return load_hparams(method, model, dataset, given, only_where_present=True)


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

    ``hparams``: used as given; otherwise :func:`method_hparams` (the model's hyperparameter file for
    ``method`` and ``dataset`` with the applicable ``overrides``, e.g. ``{"v_autocast": "bfloat16"}``).
    Either way the hyperparameters enter the run's cache folder, so differently configured runs never mix.

    Resuming: the edited weights are kept in the run folder until the evaluation is complete, so an
    interrupted evaluation (long with ``generation``) continues without editing again; ROME's sequential
    edits are replayed from its trajectory file where they exist (:func:`rome_trajectory`).

    The summary holds the metrics in percent with 95% CIs (normal approximation) and their n's, the
    editor's timings, and ``delta_norms`` (Frobenius norm of Δ per edited weight, for Fig. 4).
    """
    from . import distributed
    from .editing import edit

    if distributed.world_size() > 1:  # torchrun: values and evaluation shard over the ranks
        return distributed.run_edit_eval_sharded(
            model, tok, method, dataset, n_edits, seed, generation, hparams=hparams, runs_dir=runs_dir, cache=cache,
            eval_batch_size=eval_batch_size, progress=progress, overrides=overrides)
    records, pool = table_selection(dataset, n_edits, seed, full=paper_pool(model))
    hp = None if method == UNEDITED else (hparams or method_hparams(method, model, dataset, overrides))
    out, meta = _run_location(model, method, dataset, len(records), seed, hp, generation, runs_dir, cache, pool)
    trajectory = rome_trajectory(model, dataset, seed, hp, runs_dir, cache, pool) if method in SEQUENTIAL else None
    with contextlib.ExitStack() as locks:
        if trajectory is not None:  # the trajectory first, as run_sweep locks it (and only it)
            locks.enter_context(run_lock(trajectory))
        locks.enter_context(run_lock(out))
        summary_path = out / "summary.json"
        if summary_path.exists():
            return json.loads(summary_path.read_text())
        if method == UNEDITED:
            return _evaluate_and_save(model, tok, records, dataset, out, meta, generation, eval_batch_size, progress)

        saved = EditedWeights(out / "edited_weights.safetensors", model, meta["hparams"])
        edited = saved.load()
        if edited is None:
            t0 = time.perf_counter()
            extra = {"checkpoint": trajectory} if trajectory is not None else {}
            result = edit(model, tok, [r.as_request() for r in records], method=method, hparams=hp,
                          cache_dir=cache, progress=progress, **extra)
            edited = saved.save(result, time.perf_counter() - t0)
        try:
            summary = _evaluate_and_save(model, tok, records, dataset, out, meta, generation, eval_batch_size,
                                         progress, edited, hp)
        finally:
            edited.restore()
        saved.path.unlink(missing_ok=True)  # complete: the summary is the result
        return summary


class EditedWeights:
    """The weights an edit changed, saved in its run folder so the evaluation can resume without editing
    again. ``load`` puts them into the model (exact copies) and returns a handle whose ``restore()`` puts the
    originals back; the handle also carries the edit's seconds, timings and Δ norms for the summary."""

    def __init__(self, path: Path, model, hp_id: str):
        from .models import model_fingerprint

        self.path, self.model = Path(path), model
        self.key = f"{model_fingerprint(model)}|{hp_id}"

    def save(self, result, seconds: float) -> SimpleNamespace:
        from .tensor_cache import save_entry

        names = list(result._originals)
        info = {"seconds": seconds, "timings": dict(getattr(result, "timings", {})),
                "delta_norms": {k: float(torch.linalg.norm(v.float())) for k, v in result.deltas.items()}}
        save_entry(self.path, {n: self.model.get_parameter(n).detach() for n in names}, self.key, info)
        return SimpleNamespace(restore=result.restore, **info)

    def load(self) -> SimpleNamespace | None:
        from .tensor_cache import load_entry

        hit = load_entry(self.path, self.key) if self.path.exists() else None
        if hit is None:
            return None
        tensors, info = hit
        originals = {n: self.model.get_parameter(n).detach().clone() for n in tensors}

        def restore():
            with torch.no_grad():
                for n, w0 in originals.items():
                    self.model.get_parameter(n).copy_(w0)

        with torch.no_grad():
            for n, w in tensors.items():
                p = self.model.get_parameter(n)
                p.copy_(w.to(p.device, p.dtype))
        return SimpleNamespace(restore=restore, **info)


def rome_trajectory(model, dataset: str, seed: int, hp, runs_dir=None, cache=None, pool: str = POOL_SUBSET) -> Path:
    """Where the sequential ROME edits of ``(model, dataset, seed, hparams)`` keep their trajectory. One
    file serves every run size: a run of ``n`` edits edits a prefix of a longer run's records, so Table 1's
    run and Fig. 3's sweep (any N) replay and extend the same trajectory."""
    runs_dir = Path(runs_dir) if runs_dir is not None else cache_dir() / "runs"
    name = getattr(model, "pmet_name", "model")
    full = "_full" if pool == POOL_FULL else ""
    return runs_dir / name / dataset / "rome" / f"trajectory_seed{seed}_hp{_hparams_id(hp)}{full}.safetensors"


def _run_location(model, method, dataset, n, seed, hp, generation, runs_dir, cache,
                  pool: str = POOL_SUBSET) -> tuple[Path, dict]:
    runs_dir = Path(runs_dir) if runs_dir is not None else cache_dir() / "runs"
    name = getattr(model, "pmet_name", "model")
    hp_id = _hparams_id(hp) + _artifact_id(method, model, hp, cache) + _c0_fallback_id(hp)
    out = run_dir(runs_dir, name, dataset, method, n, seed, hp_id, generation, pool)
    meta = {"model": name, "method": method, "n_edits": n, "seed": seed, "hparams": hp_id}
    return out, ({**meta, "pool": pool} if pool != POOL_SUBSET else meta)


def _c0_fallback_id(hp) -> str:
    """``"_c0<corpus>"`` when C0's corpus had to fall back (Wikipedia unreachable), so such a run never
    stands in for one with the requested corpus; ``""`` otherwise."""
    asked = getattr(hp, "mom2_corpus", None)
    if not asked:
        return ""
    from .data import resolve_corpus

    used = resolve_corpus(asked)[0]
    return "" if used == asked else f"_c0{used}"


def _evaluate_and_save(model, tok, records, dataset, out: Path, meta: dict, generation: bool, eval_batch_size: int,
                       progress: bool, edited=None, hp=None) -> dict:
    """Evaluate the (edited) model on ``records``, write ``records.jsonl`` + ``summary.json``; the summary.
    ``edited``: what the edit reported (``seconds``, ``timings``, ``delta_norms``), None when unedited."""
    from .evaluation import evaluate_counterfact, evaluate_zsre, summarize_counterfact, summarize_zsre

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if dataset == "counterfact":
        rows = evaluate_counterfact(model, tok, records, batch_size=eval_batch_size, generation=generation,
                                    out_path=out / "records.jsonl", progress=progress, meta=meta)
        summary = summarize_counterfact(rows)
        summary.update(_portability(model, tok, records, out))
    else:
        rows = evaluate_zsre(model, tok, records, batch_size=eval_batch_size, out_path=out / "records.jsonl",
                             progress=progress, meta=meta)
        summary = summarize_zsre(rows)
    summary.update(meta)
    summary["edit_seconds"] = edited.seconds if edited is not None else 0.0
    summary["eval_seconds"] = time.perf_counter() - t0
    if edited is not None:
        summary["timings"] = dict(edited.timings)
        summary["delta_norms"] = dict(edited.delta_norms)
        summary["hparams_values"] = hp.to_dict() if hasattr(hp, "to_dict") else None
        if getattr(hp, "mom2_corpus", None):
            from .data import resolve_corpus

            summary["c0_corpus"] = resolve_corpus(hp.mom2_corpus)[1] or hp.mom2_corpus
    summary["device"] = str(next(model.parameters()).device)
    summary["torch"] = torch.__version__
    summary_path = out / "summary.json"
    tmp = summary_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    os.replace(tmp, summary_path)
    return summary


def _portability(model, tok, records, out: Path) -> dict:
    """Portability of the records that have an EasyEdit one-hop question (:mod:`pmet.evaluation.portability`):
    per-record values to ``portability.json``, the summary's ``portability*`` fields returned."""
    from .evaluation.portability import score_portability, summarize_portability

    scores = score_portability(model, tok, records)
    if scores:
        (out / "portability.json").write_text(json.dumps({str(k): v for k, v in scores.items()}, sort_keys=True))
    return summarize_portability(scores)


SEQUENTIAL = sequential_methods()  # editors that apply the requests one after another (the registry)


def run_sweep(model, tok, method: str, sizes, dataset: str = "counterfact", seed: int = 0,
              generation: bool = False, runs_dir=None, cache=None, eval_batch_size: int = 32,
              progress: bool = True, overrides: dict | None = None) -> dict[int, dict]:
    """:func:`run_edit_eval` at every size of ``sizes`` (Fig. 3); ``{n: summary}``.

    For a sequential editor (ROME) the run with ``n`` edits is, step for step, the first ``n`` steps of
    the run with ``max(sizes)`` edits (the records of a smaller run are a prefix of a larger run's, and
    each step depends only on the earlier ones). So the largest run is made once and the model is
    evaluated when it has applied ``n`` edits, for every missing ``n``: the cost of one ROME run instead of
    one per point. Edits already in ROME's trajectory file are replayed, not recomputed (any earlier run
    with the same first records, of any size). The summaries land where :func:`run_edit_eval` would put
    them, and are the same.
    """
    sizes = sorted(set(int(n) for n in sizes))
    if method not in SEQUENTIAL:
        return {n: run_edit_eval(model, tok, method, dataset, n, seed, generation, runs_dir=runs_dir, cache=cache,
                                 eval_batch_size=eval_batch_size, progress=progress, overrides=overrides)
                for n in sizes}
    from . import distributed
    from .editing import edit

    if distributed.world_size() > 1:  # a sequential editor cannot shard its edits: rank 0 runs the sweep
        return distributed.on_rank0(run_sweep, model, tok, method, sizes, dataset, seed, generation, runs_dir, cache,
                                    eval_batch_size, progress, overrides)
    hp = method_hparams(method, model, dataset, overrides)
    records, pool = table_selection(dataset, sizes[-1], seed, full=paper_pool(model))
    where = {n: _run_location(model, method, dataset, n, seed, hp, generation, runs_dir, cache, pool)
             for n in sizes}
    trajectory = rome_trajectory(model, dataset, seed, hp, runs_dir, cache, pool)
    with run_lock(trajectory):  # one process extends the trajectory and evaluates its points at a time
        out = {n: json.loads((loc / "summary.json").read_text()) for n, (loc, _) in where.items()
               if (loc / "summary.json").exists()}
        missing = [n for n in sizes if n not in out]
        if not missing:
            return out

        def at_step(k: int, current) -> None:  # called by the editor after its k-th edit (its timings exclude these)
            if k not in missing or k in out:
                return
            loc, meta = where[k]
            edited = SimpleNamespace(seconds=current.timings["total"], timings=current.timings,
                                     delta_norms={n: float(torch.linalg.norm(d)) for n, d in current.deltas.items()})
            out[k] = _evaluate_and_save(model, tok, records[:k], dataset, loc, meta, generation, eval_batch_size,
                                        progress, edited, hp)

        result = edit(model, tok, [r.as_request() for r in records[:max(missing)]], method=method, hparams=hp,
                      cache_dir=cache, progress=progress, on_step=at_step, checkpoint=trajectory)
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
