"""The on-disk run cache: where a run's files live, the lock that makes one process do a run, the edited
weights that let an interrupted evaluation resume, and where ROME's sequential trajectory is kept.

A run (:class:`pmet.runspec.RunSpec` + its hyperparameters' id) lives in
``<runs_dir>/<model>/<dataset>/<method>/n{n}_seed{seed}_hp{id}[_gen][_full]/`` (``runs_dir`` defaults to
``$PMET_CACHE_DIR/runs``) with ``records.jsonl`` (per-record results, appended as evaluated: an interrupted
evaluation resumes), ``summary.json`` (written last: its presence means "done") and, while the evaluation is
incomplete, ``edited_weights.safetensors``. This module holds no experiment logic (:mod:`pmet.experiments`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from .paths import cache_dir
from .runspec import RunSpec

RECORDS = "records.jsonl"  # a run folder's per-record rows (module docstring)
SUMMARY = "summary.json"  # written last: the run is complete
EDITED_WEIGHTS = "edited_weights.safetensors"  # kept only while an evaluation is incomplete
PORTABILITY = "portability.json"  # per-record portability of the records with a one-hop question


def runs_root(runs_dir=None) -> Path:
    """``runs_dir`` or ``$PMET_CACHE_DIR/runs``."""
    return Path(runs_dir) if runs_dir is not None else cache_dir() / "runs"


def run_folder(spec: RunSpec, hparams_id: str, runs_dir=None) -> Path:
    """The folder of the run ``spec`` with hyperparameters ``hparams_id`` (see module docstring)."""
    return runs_root(runs_dir) / spec.model / spec.dataset / spec.method / spec.run_tag(hparams_id)


def trajectory_path(spec: RunSpec, hparams_id: str, runs_dir=None) -> Path:
    """Where the sequential ROME edits of ``(model, dataset, seed, hyperparameters)`` keep their trajectory.
    One file serves every run size: a run of ``n`` edits edits a prefix of a longer run's records, so Table 1's
    run and Fig. 3's sweep (any N) replay and extend the same trajectory."""
    full = "_full" if spec.pool == "full" else ""  # the extended pool continues the subset's order: shared
    return (
        runs_root(runs_dir)
        / spec.model
        / spec.dataset
        / spec.method
        / f"trajectory_seed{spec.seed}_hp{hparams_id}{full}.safetensors"
    )


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


def read_summary(folder: Path) -> dict | None:
    """The run's summary, or None while the run is not complete."""
    path = Path(folder) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def write_summary(folder: Path, summary: dict) -> None:
    """Write ``summary.json`` atomically (written last: it marks the run complete)."""
    path = Path(folder) / SUMMARY
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def records_in_order(folder: Path, case_ids: list) -> list[dict]:
    """The per-record rows of a complete run, in the order of ``case_ids`` (the run's record order)."""
    from .evaluation.results import load_results

    _, rows = load_results(Path(folder) / RECORDS)
    by_id = {r["case_id"]: r for r in rows}
    missing = [c for c in case_ids if c not in by_id]
    if missing:
        raise ValueError(f"{folder}/{RECORDS} lacks {len(missing)} of the run's records (first: {missing[0]})")
    return [by_id[c] for c in case_ids]


def seed_from_committed(folder: Path, stored, meta: dict | None = None) -> dict:
    """Fill the run folder ``folder`` from a committed run file's contents ``stored``
    (:class:`pmet.runstore.StoredRun`): its rows as ``records.jsonl`` (with ``meta``), their value diagnostics
    as ``value_diagnostics.json`` (where the rows carry them) and its summary as ``summary.json`` (last: the run
    is then complete). Whatever reads the run folder afterwards -- the notebooks' per-record files included --
    sees the committed run. Returns the summary."""
    from .diagnostics import FIELD, write_run_diagnostics
    from .diagnostics import RUN_FILE as FIELD_FILE
    from .evaluation.results import ResultsFile

    folder = Path(folder)
    # an interrupted run's files, or a finished one's that the committed run replaces: the summary first (the
    # run is incomplete until the new one is written), then every by-product of the evaluation
    for old in (SUMMARY, RECORDS, EDITED_WEIGHTS, FIELD_FILE, PORTABILITY):
        (folder / old).unlink(missing_ok=True)
    rows = [{k: v for k, v in r.items() if k != FIELD} for r in stored.rows]
    ResultsFile(folder / RECORDS, meta).append(rows)
    diags = [{"case_id": r["case_id"], **r[FIELD]} for r in stored.rows if r.get(FIELD) is not None]
    if diags:
        write_run_diagnostics(folder, diags, stored.spec.get("method"))
    write_summary(folder, stored.summary)
    return stored.summary


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
        info = {
            "seconds": seconds,
            "timings": dict(getattr(result, "timings", {})),
            # value vectors read from the cache cost nothing: edit times are comparable only without them
            "values_cached": sum(1 for i in getattr(result, "value_info", None) or [] if i.get("cached")),
            "delta_norms": {k: float(torch.linalg.norm(v.float())) for k, v in result.deltas.items()},
        }
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
