"""Mass-editing experiments: choose records, edit, evaluate, summarise -- with every step cached.

This is the glue the table and figure notebooks call; it holds no algorithm of its own. One run is a
:class:`pmet.runspec.RunSpec` ``(model, dataset, method, n_edits, seed, precision, generation, overrides)``:
the first ``n_edits`` records of a seeded permutation of the dataset's table records are edited at once (one
call of the editor, as the paper's mass edits), the edited model is evaluated on the same records, the
weights are restored. Where the per-record results and the summary are kept, the lock that makes one process
do a run, and the resumable edited weights are :mod:`pmet.runcache`'s: a second call returns at once and an
interrupted evaluation resumes. Value vectors and key statistics are cached by the editor itself, so the
points of a sweep share them. Every summary carries its spec (``summary["spec"]``; :func:`pmet.runspec.spec_of`).

Record choice: CounterFact tables use the 1,653 full-field records *minus* those whose case id is in
the ``counterfact-val`` split (hyperparameters are tuned on that split only). zsRE tables use the
1,037-record eval subset. Where ROME's complete files are in the data folder (``counterfact.json``, 21,919
records; ``zsre_mem_eval.json``, 19,086), for the paper's models (gptj, neox), and for any run larger than
the subset, the pool is the complete file instead (downloaded and checksummed when missing), again minus the
val ids (:func:`table_selection`); such runs are kept apart in the cache (``_full`` in the run folder name).
Offline, the *extended* pool (``RunSpec(pool="extended")``) goes beyond the full-field records with reduced
``counterfact-edit`` records placed after all of them (``_ext``). Nested permutations mean that a smaller run
edits a prefix of a larger run's records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .diagnostics import save_run_diagnostics, value_diagnostics, write_run_diagnostics
from .editing import UNEDITED, MethodUnavailable, get_editor, load_hparams, sequential_methods
from .paths import shown
from .runcache import (
    EDITED_WEIGHTS,
    PORTABILITY,
    RECORDS,
    EditedWeights,
    read_summary,
    run_folder,
    run_lock,
    seed_from_committed,
    trajectory_path,
    write_summary,
)
from .runspec import RunSpec, results_path

POOL_SUBSET, POOL_FULL, POOL_EXTENDED = "subset", "full", "extended"
COMPLETE_FILES = {"counterfact": "counterfact.json", "zsre": "zsre_mem_eval.json"}  # the paper's complete sets


def _pool_kind(dataset: str, n: int | None, subset_size: int, full: bool | None) -> str:
    """Which pool a table draws from: the complete file (:data:`COMPLETE_FILES`) when ``full`` is True
    (downloaded if missing; an error with its URL if that fails), when it is present in the data folder
    (``full=None``), or when ``n`` exceeds the subset (then downloaded as for True); else the subset."""
    from .data import DataNotFoundError, ensure_file

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
    try:
        ensure_file(rel)  # DataNotFoundError: one line with the URL and what to do
    except DataNotFoundError as exc:
        if dataset != "counterfact" or full is True or n is None:
            raise
        raise DataNotFoundError(
            f"{exc} (or, offline, the extended pool: pool='extended' / --pool extended / -p pool extended edits "
            f"the full-field records, then reduced ones)"
        ) from None
    return POOL_FULL


def table_selection(
    dataset: str, n: int | None = None, seed: int = 0, full_fields_only: bool = True, full: bool | None = None
) -> tuple[list, str]:
    """``(records, pool)``: the records a table edits and evaluates (module docstring) and the pool they come
    from, ``"subset"``, ``"full"`` (see :func:`_pool_kind`) or ``"extended"``. The full CounterFact pool is
    ROME's complete ``counterfact.json`` (21,919 records) minus the ``counterfact-val`` case ids; the full zsRE
    pool is ``zsre_mem_eval.json`` (19,086). ``n=None`` means all of them.

    ``full_fields_only=False`` (CounterFact, offline): where ``n`` exceeds the full-field records, the
    reduced EasyEdit records of ``counterfact-edit`` (not full-field, outside val; one paraphrase and one
    neighbourhood prompt each, no generation prompts) follow them -- every full-field record first, in the
    subset's order, then the reduced ones in their own seeded order -- so the first 1,590 records of a 10,000-edit
    run are exactly the 1,590-edit run's (its value vectors are reused) and generation metrics come from them;
    the pool is then ``"extended"``. ``counterfact-train`` is left out: MEND trains on it
    (:func:`table_pool_ids`)."""
    from .data import load_counterfact, load_zsre

    reduced: list = []
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
                reduced = [r for r in load_counterfact("edit") if r.case_id not in have and r.case_id not in val_ids]
                kind = POOL_EXTENDED
    elif dataset == "zsre":
        subset = [] if full else load_zsre("eval")
        kind = _pool_kind(dataset, n, len(subset), full)
        pool = load_zsre("mem_eval") if kind == POOL_FULL else subset
    else:
        raise ValueError(f"dataset must be 'counterfact' or 'zsre', not {dataset!r}")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    later = list(range(len(reduced)))  # the reduced records after every full-field one, in their own order
    random.Random(f"{seed}/reduced").shuffle(later)
    chosen = [pool[i] for i in order] + [reduced[i] for i in later]
    if n is not None and n > len(chosen):
        raise ValueError(
            f"{dataset}: asked for {n} records, only {len(chosen)} available "
            f"({kind} pool, full_fields_only={full_fields_only})"
        )
    return chosen[: n if n is not None else len(chosen)], kind


def table_records(
    dataset: str, n: int | None = None, seed: int = 0, full_fields_only: bool = True, full: bool | None = None
) -> list:
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


def _c0_fallback_id(hp) -> str:
    """``"_c0<corpus>"`` when C0's corpus had to fall back (Wikipedia unreachable), so such a run never
    stands in for one with the requested corpus; ``""`` otherwise."""
    asked = getattr(hp, "mom2_corpus", None)
    if not asked:
        return ""
    from .data import resolve_corpus

    used = resolve_corpus(asked)[0]
    return "" if used == asked else f"_c0{used}"


def method_hparams(method: str, model, dataset: str, overrides: dict | None = None):
    """The hyperparameters of ``method`` for ``model``/``dataset`` with those ``overrides`` the method has
    (e.g. ``v_autocast`` reaches ROME, MEMIT and PMET, which optimise value vectors, not FT-W or MEND: the
    loader's ``only_where_present``; a name no editor has still raises); entries that are None are ignored.
    None for the unedited model."""
    if method == UNEDITED:
        return None
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return load_hparams(method, model, dataset, given, only_where_present=True)


def run_hparams(model, spec: RunSpec, hparams=None):
    """The hyperparameters of the run ``spec``: ``hparams`` as given, else :func:`method_hparams` with the
    spec's overrides and precision; None for the unedited model."""
    if spec.method == UNEDITED:
        return None
    return hparams if hparams is not None else method_hparams(spec.method, model, spec.dataset, spec.hparam_overrides())


def spec_records(spec: RunSpec, model=None) -> tuple[list, str]:
    """``(records, pool)`` of the run ``spec`` (:func:`table_selection`); ``spec.pool`` None means
    :func:`paper_pool` of ``model`` (the complete files for the paper's models, else automatic)."""
    if spec.pool == POOL_EXTENDED:
        return table_selection(spec.dataset, spec.n_edits, spec.seed, full_fields_only=False, full=False)
    full = {"full": True, "subset": False}.get(spec.pool, paper_pool(model) if model is not None else None)
    return table_selection(spec.dataset, spec.n_edits, spec.seed, full=full)


def _has_field(hp, name: str) -> bool:
    import dataclasses

    return hp is not None and dataclasses.is_dataclass(hp) and name in {f.name for f in dataclasses.fields(hp)}


def locate(model, spec: RunSpec, hp, runs_dir=None, cache=None, pool: str | None = None) -> SimpleNamespace:
    """Where the run ``spec`` with hyperparameters ``hp`` lives and what it records about itself:
    ``folder``, ``hp_id`` (hyperparameters + trained-editor identity + C0 corpus fallback), ``meta`` (stored in
    and checked against its per-record file) and ``spec`` -- the spec as run: its ``pool`` the record pool
    used (``pool``, else the spec's, else ``"subset"``) and its ``value_autocast`` the precision the editor
    really used (None for editors without value vectors, whatever was asked), its ``overrides`` those the
    method has."""
    name = getattr(model, "pmet_name", None)
    if name is not None and name != spec.model:
        raise ValueError(f"the run is for model {spec.model!r} but the loaded model is {name!r}")
    ran = spec.replace(
        value_autocast=getattr(hp, "v_autocast", None) if hp is not None else None,
        pool=pool or spec.pool or POOL_SUBSET,
        overrides={k: v for k, v in spec.overrides if _has_field(hp, k)},
    )
    hp_id = _hparams_id(hp) + _artifact_id(spec.method, model, hp, cache) + _c0_fallback_id(hp)
    meta = {"model": spec.model, "method": spec.method, "n_edits": spec.n_edits, "seed": spec.seed, "hparams": hp_id}
    if ran.pool != POOL_SUBSET:
        meta["pool"] = ran.pool
    return SimpleNamespace(spec=ran, hp=hp, hp_id=hp_id, folder=run_folder(ran, hp_id, runs_dir), meta=meta)


def _stage(progress: bool, spec: RunSpec, what: str) -> None:
    """One line on stderr per stage of a run, so a long job shows where it is (also through papermill)."""
    if progress:
        extra = ("" if spec.value_autocast is None else f" values {spec.value_autocast}") + (
            " +generation" if spec.generation and spec.dataset == "counterfact" else ""
        )
        print(
            f"[pmet {time.strftime('%H:%M:%S')}] {spec.model} {spec.dataset} {spec.method} n={spec.n_edits} "
            f"seed={spec.seed}{extra}: {what}",
            file=sys.stderr,
            flush=True,
        )


def _completed(summary: dict, run: SimpleNamespace) -> dict:
    """A summary read back from the cache; one written before specs were recorded gets its spec."""
    if "hparams" in summary and "spec" not in summary:
        summary = {
            **summary,
            "spec": run.spec.to_dict(),
            "dataset": run.spec.dataset,
            "generation": run.spec.generation,
        }
    return summary


_COMMITTED_UNDER_TORCHRUN = (
    "committed= (reading committed runs) runs in one process, not under torchrun: read them once without "
    "torchrun (they are then in the cache), and torchrun the rest"
)


def run_edit_eval(
    model,
    tok,
    spec: RunSpec,
    *,
    hparams=None,
    runs_dir: str | Path | None = None,
    cache: str | Path | None = None,
    eval_batch_size: int = 32,
    progress: bool = True,
    committed: str | Path | None = None,
) -> dict:
    """Run ``spec`` (edit its ``n_edits`` records with its method, ``"none"`` = unedited; evaluate; restore) on
    the loaded ``model``/``tok``; return the summary.

    ``hparams``: used as given instead of the spec's (:func:`run_hparams`); either way the hyperparameters
    enter the run's cache folder, so differently configured runs never mix. ``runs_dir``/``cache``: the run
    cache and the editor's caches (defaults under ``$PMET_CACHE_DIR``); ``eval_batch_size``, ``progress``
    (progress bars and one stage line per step on stderr) change how, not what, is computed.

    Resuming: the edited weights are kept in the run folder until the evaluation is complete, so an
    interrupted evaluation (long with ``generation``) continues without editing again; ROME's sequential
    edits are replayed from its trajectory file where they exist (:func:`pmet.runcache.trajectory_path`).

    The summary holds the metrics in percent with 95% intervals (the per-metric rule of
    :func:`pmet.evaluation.stats.metric_ci`) and their n's, the editor's timings, ``delta_norms``
    (Frobenius norm of Δ per edited weight, for Fig. 4) and ``spec``.

    ``committed``: a folder holding ``results/`` (e.g. the repository). Where that folder has the committed
    per-record file of exactly this run (:func:`committed_run`: same path, same identity), the run is read
    from the file into the cache (printed) instead of edited and evaluated again: adding one editor to a
    committed table then costs that editor only. The file wins over a finished cached run whose results
    differ (:func:`_finished`).
    """
    from . import distributed
    from .editing import edit

    if distributed.world_size() > 1:  # torchrun: values and evaluation shard over the ranks
        if committed is not None:
            raise ValueError(_COMMITTED_UNDER_TORCHRUN)
        return distributed.run_edit_eval_sharded(
            model,
            tok,
            spec,
            hparams=hparams,
            runs_dir=runs_dir,
            cache=cache,
            eval_batch_size=eval_batch_size,
            progress=progress,
        )
    records, pool = spec_records(spec, model)
    hp = run_hparams(model, spec, hparams)
    run = locate(model, spec, hp, runs_dir, cache, pool)
    trajectory = trajectory_path(run.spec, _hparams_id(hp), runs_dir) if spec.method in SEQUENTIAL else None
    with contextlib.ExitStack() as locks:
        if trajectory is not None:  # the trajectory first, as run_sweep locks it (and only it)
            locks.enter_context(run_lock(trajectory))
        locks.enter_context(run_lock(run.folder))
        if (summary := _finished(run, committed, len(records), progress)) is not None:
            return summary
        if spec.method == UNEDITED:
            _stage(progress, run.spec, f"evaluating {len(records)} records")
            return _evaluate_and_save(model, tok, records, run, eval_batch_size, progress)

        saved = EditedWeights(run.folder / EDITED_WEIGHTS, model, run.hp_id)
        edited = saved.load()
        if edited is None:
            _stage(progress, run.spec, f"editing {len(records)} records")
            t0 = time.perf_counter()
            extra = {"checkpoint": trajectory} if trajectory is not None else {}
            result = edit(
                model,
                tok,
                [r.as_request() for r in records],
                method=spec.method,
                hparams=hp,
                cache_dir=cache,
                progress=progress,
                **extra,
            )
            edited = saved.save(result, time.perf_counter() - t0)
            save_run_diagnostics(run.folder, result)  # per request, kept beside the records (pmet.diagnostics)
        _stage(progress, run.spec, f"evaluating {len(records)} edited records")
        try:
            summary = _evaluate_and_save(model, tok, records, run, eval_batch_size, progress, edited)
        finally:
            edited.restore()
        saved.path.unlink(missing_ok=True)  # complete: the summary is the result
        return summary


def committed_run(root: str | Path, run: SimpleNamespace, n_records: int | None = None):
    """The committed per-record file of ``run`` (:func:`locate`) under ``root`` as a
    :class:`pmet.runstore.StoredRun`, if the file at its path (:func:`pmet.runspec.results_path`) holds exactly
    this run: the same identity (:func:`pmet.runstore.run_identity`: model, dataset, method, size, seed, value
    precision, generation, pool, hyperparameter id, overrides) and, given ``n_records``, that many rows.
    Else None."""
    from .runstore import read_run, run_identity

    path = results_path(root, run.spec, run.hp_id)
    if not path.exists():
        return None
    stored = read_run(path)
    want = run_identity({**run.spec.to_dict(), "hparams_id": run.hp_id})
    if run_identity(stored.spec) != want or (n_records is not None and len(stored.rows) != n_records):
        return None
    return stored


def _finished(run: SimpleNamespace, committed, n_records: int, progress: bool) -> dict | None:
    """The summary of ``run`` if it is finished: read from its committed per-record file under ``committed``
    (:func:`committed_run`) into its cache folder where that file exists, else from the cache; None if neither.

    The committed file comes first: a finished cached run whose results differ from it (computed on another
    CPU, or by an earlier version) is replaced by it, and a stage line says so -- so a rendering with
    ``committed`` never rewrites a committed file with other last bits."""
    done = read_summary(run.folder)
    stored = committed_run(committed, run, n_records) if committed is not None else None
    if stored is None:
        if done is not None:
            _stage(progress, run.spec, "done (cached)")
            return _completed(done, run)
        return None
    if done is not None and same_results(done, stored.summary):
        _stage(progress, run.spec, "done (cached, the same as the committed run)")
        return _completed(done, run)
    if done is not None:
        _stage(progress, run.spec, "the cached run differs from the committed one: the committed run replaces it")
    _stage(progress, run.spec, f"read from the committed run {shown(stored.path, committed)}")
    return seed_from_committed(run.folder, stored, run.meta)


TIMING_KEYS = frozenset({"edit_seconds", "eval_seconds", "timings", "values_cached", "torch", "device"})


def same_results(a: dict, b: dict) -> bool:
    """Whether two run summaries report the same results: every entry equal except where and how fast the run
    was made (:data:`TIMING_KEYS`); NaN (in the cache) and None (in a committed file) count as equal."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items() if k not in TIMING_KEYS}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x

    return plain(a) == plain(b)


def _evaluate_and_save(
    model, tok, records, run: SimpleNamespace, eval_batch_size: int, progress: bool, edited=None
) -> dict:
    """Evaluate the (edited) model on ``records``, write ``records.jsonl`` + ``summary.json``; the summary.
    ``edited``: what the edit reported (``seconds``, ``timings``, ``delta_norms``), None when unedited."""
    from .evaluation import evaluate_counterfact, evaluate_zsre, summarize_counterfact, summarize_zsre

    out, spec, hp = run.folder, run.spec, run.hp
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if spec.dataset == "counterfact":
        rows = evaluate_counterfact(
            model,
            tok,
            records,
            batch_size=eval_batch_size,
            generation=spec.generation,
            out_path=out / RECORDS,
            progress=progress,
            meta=run.meta,
        )
        summary = summarize_counterfact(rows)
        summary.update(_portability(model, tok, records, out))
    else:
        rows = evaluate_zsre(
            model,
            tok,
            records,
            batch_size=eval_batch_size,
            out_path=out / RECORDS,
            progress=progress,
            meta=run.meta,
        )
        summary = summarize_zsre(rows)
    summary.update(run.meta)
    summary["spec"] = spec.to_dict()
    summary["generation"] = spec.generation
    summary["edit_seconds"] = edited.seconds if edited is not None else 0.0
    summary["eval_seconds"] = time.perf_counter() - t0
    if edited is not None:
        summary["timings"] = dict(edited.timings)
        summary["delta_norms"] = dict(edited.delta_norms)
        if getattr(edited, "values_cached", None) is not None:
            summary["values_cached"] = edited.values_cached
        summary["hparams_values"] = hp.to_dict() if hasattr(hp, "to_dict") else None
        if getattr(hp, "mom2_corpus", None):
            from .data import resolve_corpus

            summary["c0_corpus"] = resolve_corpus(hp.mom2_corpus)[1] or hp.mom2_corpus
    summary["device"] = str(next(model.parameters()).device)
    summary["torch"] = torch.__version__
    write_summary(out, summary)
    return summary


def _portability(model, tok, records, out: Path) -> dict:
    """Portability of the records that have an EasyEdit one-hop question (:mod:`pmet.evaluation.portability`):
    per-record values to ``portability.json``, the summary's ``portability*`` fields returned."""
    from .evaluation.portability import score_portability, summarize_portability

    scores = score_portability(model, tok, records)
    if scores:
        (out / PORTABILITY).write_text(json.dumps({str(k): v for k, v in scores.items()}, sort_keys=True))
    return summarize_portability(scores)


SEQUENTIAL = sequential_methods()  # editors that apply the requests one after another (the registry)


def run_sweep(
    model,
    tok,
    spec: RunSpec,
    sizes,
    *,
    runs_dir=None,
    cache=None,
    eval_batch_size: int = 32,
    progress: bool = True,
    committed: str | Path | None = None,
) -> dict[int, dict]:
    """:func:`run_edit_eval` of ``spec`` at every size of ``sizes`` (Fig. 3; the spec's own ``n_edits`` is
    replaced by each size); ``{n: summary}``.

    For a sequential editor (ROME) the run with ``n`` edits is, step for step, the first ``n`` steps of
    the run with ``max(sizes)`` edits (the records of a smaller run are a prefix of a larger run's, and
    each step depends only on the earlier ones). So the largest run is made once and the model is
    evaluated when it has applied ``n`` edits, for every missing ``n``: the cost of one ROME run instead of
    one per point. Edits already in ROME's trajectory file are replayed, not recomputed (any earlier run
    with the same first records, of any size). The summaries land where :func:`run_edit_eval` would put
    them, and are the same.

    ``committed``: as for :func:`run_edit_eval`, point by point: a size whose committed per-record file holds
    exactly that run is read from it; for ROME the trajectory then runs only to the largest size still missing.
    """
    sizes = sorted(set(int(n) for n in sizes))
    opts = dict(runs_dir=runs_dir, cache=cache, eval_batch_size=eval_batch_size, progress=progress)
    if spec.method not in SEQUENTIAL:
        return {n: run_edit_eval(model, tok, spec.replace(n_edits=n), committed=committed, **opts) for n in sizes}
    from . import distributed
    from .editing import edit

    if distributed.world_size() > 1:  # a sequential editor cannot shard its edits: rank 0 runs the sweep
        if committed is not None:
            raise ValueError(_COMMITTED_UNDER_TORCHRUN)
        return distributed.on_rank0(run_sweep, model, tok, spec, sizes, **opts)
    hp = run_hparams(model, spec)
    records, pool = spec_records(spec.replace(n_edits=sizes[-1]), model)
    where = {n: locate(model, spec.replace(n_edits=n), hp, runs_dir, cache, pool) for n in sizes}
    trajectory = trajectory_path(where[sizes[-1]].spec, _hparams_id(hp), runs_dir)
    with run_lock(trajectory):  # one process extends the trajectory and evaluates its points at a time
        out = {n: s for n in sizes if (s := _finished(where[n], committed, n, progress)) is not None}
        missing = [n for n in sizes if n not in out]
        if not missing:
            return out

        def at_step(k: int, current) -> None:  # called by the editor after its k-th edit (its timings exclude these)
            if k not in missing or k in out:
                return
            edited = SimpleNamespace(
                seconds=current.timings["total"],
                timings=current.timings,
                delta_norms={n: float(torch.linalg.norm(d)) for n, d in current.deltas.items()},
            )
            diags = value_diagnostics([r.as_request() for r in records[:k]], current.value_info[:k], hp)
            if diags is not None:
                write_run_diagnostics(where[k].folder, diags, spec.method)
            _stage(progress, where[k].spec, f"evaluating after {k} sequential edits")
            out[k] = _evaluate_and_save(model, tok, records[:k], where[k], eval_batch_size, progress, edited)

        _stage(progress, where[max(missing)].spec, f"editing {max(missing)} records one after another")
        result = edit(
            model,
            tok,
            [r.as_request() for r in records[: max(missing)]],
            method=spec.method,
            hparams=hp,
            cache_dir=cache,
            progress=progress,
            on_step=at_step,
            checkpoint=trajectory,
        )
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


def train_mend_if_missing(
    model, tok, dataset: str = "counterfact", cache=None, progress: bool = True, overrides: dict | None = None
) -> None:
    """Train MEND's editor for ``model`` (hyperparameters with ``overrides``, e.g. fewer ``steps``) when the
    cache has none (as ``python -m pmet.editing.mend train``: its own progress bar with ETA, checkpoints,
    resumable); a no-op when it is trained."""
    from .editing.mend import editor_dir, train

    hp = method_hparams("mend", model, dataset, overrides)
    if (editor_dir(model, hp, cache) / "editor.safetensors").exists():
        return
    if progress:
        print(
            f"[pmet {time.strftime('%H:%M:%S')}] {getattr(model, 'pmet_name', 'model')}: training MEND's editor "
            f"({hp.steps} steps, once per model and cache)",
            file=sys.stderr,
            flush=True,
        )
    train(model, tok, hp, cache_dir=cache, progress=progress)


def run_grid(
    model_names,
    methods,
    dataset: str = "counterfact",
    n_edits: int | dict | None = None,
    default_n: int = 1000,
    seed: int = 0,
    generation: bool = False,
    value_autocast: str | None = None,
    overrides: dict | None = None,
    device: str = "cpu",
    train_mend: bool = False,
    pool: str | None = None,
    **options,
) -> dict:
    """Run :func:`run_edit_eval` for every (model, method); returns ``{model: {method: summary}}``.

    ``methods`` is a list, or a ``{model: [methods]}`` dict when the blocks differ (e.g. a second model
    without a trained MEND); ``n_edits`` an int or a ``{model: n}`` dict (:func:`resolve_n_edits`);
    ``options`` go to :func:`run_edit_eval` (``runs_dir``, ``cache``, ``eval_batch_size``, ``progress``).
    ``train_mend``: train MEND first where its editor is missing (:func:`train_mend_if_missing`).
    ``pool``: the record pool (:class:`pmet.runspec.RunSpec`), e.g. ``"extended"`` for CounterFact runs
    beyond the 1,590 full-field records offline (:func:`table_selection`).

    A method that cannot run here records ``{"unavailable": reason}`` instead of a summary, so a table
    shows why a row is missing rather than silently dropping it.
    """
    from .models import load_model

    out: dict = {}
    for name in model_names:
        model, tok = load_model(name, device=device)
        n = resolve_n_edits(name, n_edits, default_n)
        out[name] = {}
        chosen = methods.get(name, []) if isinstance(methods, dict) else methods
        if train_mend and "mend" in chosen:
            train_mend_if_missing(model, tok, dataset, options.get("cache"), options.get("progress", True), overrides)
        for method in chosen:
            spec = RunSpec(
                model=name,
                method=method,
                dataset=dataset,
                n_edits=n,
                seed=seed,
                generation=generation,
                value_autocast=value_autocast,
                overrides=tuple((overrides or {}).items()),
                pool=pool,
            )
            try:
                out[name][method] = run_edit_eval(model, tok, spec, **options)
            except MethodUnavailable as exc:
                out[name][method] = {
                    "unavailable": str(exc),
                    "method": method,
                    "model": name,
                    "n_edits": n,
                    "spec": spec.to_dict(),
                }
        del model
    return out
