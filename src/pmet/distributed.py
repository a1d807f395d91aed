"""Scale-out with ``torch.distributed``: value optimisation and evaluation shard over processes or GPUs.

Launch any run with ``torchrun --nproc_per_node=K -m pmet run ...`` (or call :func:`init` in a script
started by torchrun): :func:`pmet.experiments.run_edit_eval` then hands the run to
:func:`run_edit_eval_sharded`, which splits it as follows (rank ``r`` of ``K``):

1. **values** (PMET, MEMIT and their ablations): the requests are cut into the batches of ``v_batch_size``
   that one process would optimise, and rank ``r`` optimises batches ``r, r+K, ...``. Each value vector
   lands in the content-keyed value cache (``<cache>/values/``), so a batch gives the same vectors here as
   in one process. Context templates are generated once, by rank 0.
2. **edit**: rank 0 runs the editor, which now finds every value in the cache, computes the key statistics
   and solves Eq. 9 layer by layer; it saves the edited weights in the run folder (as a single process does
   for resuming), and every other rank loads them. Sequential editors (ROME) and FT-W / MEND edit on rank 0.
3. **evaluation**: the records are cut into the batches of ``eval_batch_size`` one process would score;
   rank ``r`` scores batches ``r, r+K, ...`` into its own per-record file ``records.rank<r>of<K>.jsonl``;
   rank 0 merges them into ``records.jsonl`` (records order) and writes ``summary.json`` with the code a
   single process uses. The summary's ``world_size`` says how the run was made.

Rank 0 holds the run's lock, so another process asking for the same run waits as usual; a run already in
the cache is read, not redone. All ranks must see one filesystem (one node, or a shared cache folder).
Backends: ``nccl`` on CUDA (each rank on ``cuda:LOCAL_RANK``), ``gloo`` on CPU. Collective calls wait up to
``PMET_DIST_TIMEOUT_H`` hours (default 48: rank 0's edit of 10,000 requests runs while the others wait).
A sweep of a sequential editor (ROME in Fig. 3) runs on rank 0 alone (:func:`on_rank0`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

_LOCAL = 0  # > 0 inside local(): this process acts alone


def init(backend: str | None = None) -> bool:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1): ``nccl`` where CUDA is present
    (and the rank's default device becomes ``cuda:LOCAL_RANK``), else ``gloo``. Returns whether a group of
    more than one process is active. Safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    hours = float(os.environ.get("PMET_DIST_TIMEOUT_H", "48"))
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=hours))
    return dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the group (1 without one, or inside :func:`local`)."""
    if _LOCAL or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def local():
    """Inside this block the process behaves as a single process (no sharding, no collectives)."""
    global _LOCAL
    _LOCAL += 1
    try:
        yield
    finally:
        _LOCAL -= 1


def broadcast(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _rank0(fn, *args, share: bool = True, **kwargs):
    """Run ``fn`` on rank 0 alone (as a single process) while the others wait; an exception there is raised
    on every rank (so none waits forever). Returns rank 0's result on every rank when ``share``, else on
    rank 0 only (None elsewhere)."""
    result = None
    if rank() == 0:
        try:
            with local():
                result = fn(*args, **kwargs)
        except BaseException as exc:
            try:  # the same exception on every rank (e.g. MethodUnavailable, which callers catch)
                broadcast((None, exc))
            except Exception:  # noqa: BLE001 - not picklable: its text
                broadcast((None, RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}")))
            raise
    shared, error = broadcast((result if share else None, None))
    if error is not None:
        raise error
    return result if rank() == 0 else shared


def on_rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 alone; every rank returns its (picklable) result."""
    return _rank0(fn, *args, **kwargs)


def shard_batches(n: int, batch_size: int, r: int, k: int) -> list[list[int]]:
    """The index batches ``[s, s+batch_size)`` of ``range(n)`` that rank ``r`` of ``k`` takes: batch ``b`` goes to
    rank ``b % k``. Concatenated and re-cut by ``batch_size`` they are the same batches again (only the last
    batch of all can be short, and it is its rank's last)."""
    starts = range(0, n, batch_size)
    return [list(range(s, min(s + batch_size, n))) for b, s in enumerate(starts) if b % k == r]


# --------------------------------------------------------------------------------------------------------
def precompute_values(model, tok, requests, hp, cache=None, progress: bool = True) -> int:
    """Optimise this rank's share of the value vectors of ``requests`` (batches of ``hp.v_batch_size``, see
    :func:`shard_batches`) into the value cache; returns how many requests this rank handled. Context
    templates come from rank 0 (generated once, cached)."""
    from tqdm.auto import tqdm

    from .editing.context import flatten, get_context_templates
    from .editing.editor import normalize_requests
    from .editing.values import compute_values

    reqs = normalize_requests(requests, tok)
    layers = tuple(sorted(hp.layers if hp.layers is not None else model.layout.critical_layers))
    templates = _rank0(
        get_context_templates, model, tok, hp.context_length, hp.context_n_per_start, hp.context_seed, cache_dir=cache
    )
    flat, _ = flatten(templates)
    mine = shard_batches(len(reqs), hp.v_batch_size, rank(), world_size())
    for batch in tqdm(mine, desc=f"values rank {rank()}/{world_size()}", disable=not progress or not mine):
        compute_values(model, tok, [reqs[i] for i in batch], hp, flat, layers[-1], cache_dir=cache, progress=False)
    return sum(len(b) for b in mine)


def _rank_files(out: Path) -> list[Path]:
    return sorted(out.glob("records.rank*of*.jsonl"))


def _merge_rank_files(out: Path, records) -> None:
    """Append the rows of every per-rank file to ``records.jsonl`` in ``records`` order (rows already there are
    kept), then delete the per-rank files."""
    from .evaluation.results import ResultsFile, load_results
    from .runcache import RECORDS

    files = _rank_files(out)
    if not files:
        return
    rows, meta = {}, {}
    for f in files:
        m, rs = load_results(f)
        meta = meta or m
        rows.update((r["case_id"], r) for r in rs)
    store = ResultsFile(out / RECORDS, meta)
    done = store.done_ids()
    store.append([rows[r.case_id] for r in records if r.case_id in rows and r.case_id not in done])
    for f in files:
        f.unlink()


def _evaluate_shard(model, tok, records, dataset, out: Path, meta, generation, eval_batch_size, progress) -> None:
    from .evaluation import evaluate_counterfact, evaluate_zsre
    from .evaluation.results import load_results
    from .runcache import RECORDS

    main = out / RECORDS
    done = {r["case_id"] for r in load_results(main)[1]} if main.exists() else set()
    todo = [r for r in records if r.case_id not in done]
    mine = [todo[i] for b in shard_batches(len(todo), eval_batch_size, rank(), world_size()) for i in b]
    path = out / f"records.rank{rank()}of{world_size()}.jsonl"
    if dataset == "counterfact":
        evaluate_counterfact(
            model,
            tok,
            mine,
            batch_size=eval_batch_size,
            generation=generation,
            out_path=path,
            progress=progress,
            meta=meta,
        )
    else:
        evaluate_zsre(model, tok, mine, batch_size=eval_batch_size, out_path=path, progress=progress, meta=meta)


def run_edit_eval_sharded(
    model, tok, spec, hparams=None, runs_dir=None, cache=None, eval_batch_size: int = 32, progress: bool = True
) -> dict:
    """:func:`pmet.experiments.run_edit_eval` of the run ``spec`` over the ranks of the group (module docstring);
    every rank returns the summary, which is the one a single process writes (plus ``world_size`` and the
    timings)."""
    from . import experiments as ex
    from .diagnostics import save_run_diagnostics
    from .editing import edit
    from .editing.hparams import METHODS
    from .runcache import EDITED_WEIGHTS, SUMMARY, EditedWeights, run_lock, trajectory_path

    r, k = rank(), world_size()
    method = spec.method
    records, pool = ex.spec_records(spec, model)
    hp = ex.run_hparams(model, spec, hparams)
    run = ex.locate(model, spec, hp, runs_dir, cache, pool)
    out = run.folder
    trajectory = trajectory_path(run.spec, ex._hparams_id(hp), runs_dir) if method in ex.SEQUENTIAL else None
    summary_path = out / SUMMARY
    with contextlib.ExitStack() as locks:
        if r == 0:
            if trajectory is not None:
                locks.enter_context(run_lock(trajectory))
            locks.enter_context(run_lock(out))
        if broadcast(summary_path.exists() if r == 0 else None):
            return json.loads(summary_path.read_text())
        t0 = time.perf_counter()
        edited = None
        if method != ex.UNEDITED:
            saved = EditedWeights(out / EDITED_WEIGHTS, model, run.hp_id)
            edited = saved.load() if r == 0 else None
            if broadcast(edited is None if r == 0 else None):  # not edited yet
                if method in METHODS:
                    precompute_values(model, tok, [x.as_request() for x in records], hp, cache, progress)
                    barrier()
                values_s = time.perf_counter() - t0

                def _edit():
                    t1 = time.perf_counter()
                    extra = {"checkpoint": trajectory} if trajectory is not None else {}
                    result = edit(
                        model,
                        tok,
                        [x.as_request() for x in records],
                        method=method,
                        hparams=hp,
                        cache_dir=cache,
                        progress=progress,
                        **extra,
                    )
                    result.timings["values_sharded"] = values_s  # the ranks' value optimisation before the edit
                    save_run_diagnostics(out, result)
                    return saved.save(result, values_s + time.perf_counter() - t1)

                edited = _rank0(_edit, share=False)
            if r != 0:
                edited = saved.load()
                if edited is None:
                    raise RuntimeError(f"rank {r}: the edited weights in {saved.path} do not match this model")
        if r == 0:
            _merge_rank_files(out, records)  # left by an interrupted sharded evaluation
        barrier()
        t1 = time.perf_counter()
        try:
            error = None
            try:
                _evaluate_shard(
                    model, tok, records, spec.dataset, out, run.meta, spec.generation, eval_batch_size, progress
                )
            except Exception as exc:  # tell the others, then fail everywhere
                error = f"rank {r}: {type(exc).__name__}: {exc}"
            errors = [None] * k
            dist.all_gather_object(errors, error)
            if any(errors):
                raise RuntimeError("; ".join(e for e in errors if e))
            summary = None
            if r == 0:
                _merge_rank_files(out, records)
                with local():
                    summary = ex._evaluate_and_save(model, tok, records, run, eval_batch_size, progress, edited)
                summary.update(world_size=k, eval_seconds=time.perf_counter() - t1)
                tmp = summary_path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
                os.replace(tmp, summary_path)
            summary = broadcast(summary)
        finally:
            if edited is not None:
                edited.restore()
        if r == 0 and method != ex.UNEDITED:
            saved.path.unlink(missing_ok=True)
        barrier()
        return summary
