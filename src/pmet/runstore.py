"""Committed per-record results: one gzip JSON Lines file per run, so tables, figures and claims can be
regenerated (and re-analysed, e.g. with paired tests) from the repository alone, without a model.

File format (``<folder>/<run_id>.jsonl.gz``, written deterministically: gzip mtime 0, sorted keys):

* line 1: ``{"spec": {...}, "summary": {...}}`` -- the run specification (model, dataset, method, n_edits,
  seed, hyperparameter id and values, precision, generation, ...) and the run's summary (metrics with CIs);
* every further line: one record's evaluation row exactly as :mod:`pmet.evaluation` writes it
  (``case_id`` plus the per-record metric values), in case-id order of the run; for editors that optimise
  value vectors, written since they are kept, plus the field ``value_diagnostics`` (that record's value
  optimisation: :mod:`pmet.diagnostics`; files without it read as before).

The same run always gives the same bytes, so re-committing an unchanged run is a no-op in git.

A sequential run (:mod:`pmet.sequential`) is stored the same way under ``<folder>/<model>/sequential/``, its spec
marked ``"kind": "sequential"``; :func:`iter_runs` yields the one-batch runs unless asked for another kind.

:func:`recomputed_summary` recomputes a run's metrics from its rows with the summariser the experiments use
(:func:`pmet.evaluation.summarize_counterfact` / :func:`~pmet.evaluation.summarize_zsre`), so a table rebuilt
from these files (:func:`pmet.report.regenerate_tables`) rests on the per-record values, not on the stored
summary; :func:`run_identity` says which run a file holds, for matching it to the runs an artifact recorded.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUFFIX = ".jsonl.gz"
KIND_EDIT = "edit"  # a run spec without ``kind``: one batch of edits, then evaluated


@dataclass
class StoredRun:
    """One committed run: its specification, summary and per-record rows."""

    spec: dict
    summary: dict
    rows: list[dict] = field(default_factory=list)
    path: Path | None = None

    def by_case(self) -> dict:
        """``{case_id: row}``: the rows keyed for pairing with another run on the same records."""
        return {r["case_id"]: r for r in self.rows}


def finite(obj):
    """JSON data with NaN/inf (e.g. the CI of a one-record run) replaced by None: what a run file stores."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, allow_nan=False)


def write_run(path: str | os.PathLike, spec: dict, summary: dict, rows: Iterable[dict]) -> Path:
    """Write one run to ``path`` (``.jsonl.gz``), atomically and byte-reproducibly; return the path. NaN/inf
    (e.g. a one-record run's interval) are stored as None (:func:`finite`): the file is strict JSON."""
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise ValueError(f"{path}: committed run files end with {SUFFIX}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write((_dumps(finite({"spec": spec, "summary": summary})) + "\n").encode("utf-8"))
        for row in rows:
            gz.write((_dumps(finite(row)) + "\n").encode("utf-8"))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def read_run(path: str | os.PathLike) -> StoredRun:
    """Read a file written by :func:`write_run`; a damaged file raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        head = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:]]
        return StoredRun(spec=head["spec"], summary=head["summary"], rows=rows, path=path)
    except (OSError, EOFError, IndexError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path}: not a readable committed run file ({type(exc).__name__}: {exc}); "
            "restore it with `git checkout -- <file>` or regenerate the run"
        ) from exc


def run_kind(spec: dict) -> str:
    """What a run file holds: ``"edit"`` (one batch of edits, then evaluated: a spec without ``kind``) or the
    spec's ``kind`` (``"sequential"``: :func:`pmet.sequential.save_sequential_run`)."""
    return spec.get("kind") or KIND_EDIT


def iter_runs(folder: str | os.PathLike, kind: str | None = KIND_EDIT, **match) -> Iterator[StoredRun]:
    """Every run under ``folder`` (recursively, sorted by path) of that ``kind`` (:func:`run_kind`; None: every
    kind) whose spec has ``spec[k] == v`` for each ``k=v`` in ``match``. The default reads the one-batch runs
    only, so the tables, their claims and the diagnostics never see a sequential run."""
    for p in sorted(Path(folder).rglob(f"*{SUFFIX}")):
        run = read_run(p)
        if (kind is None or run_kind(run.spec) == kind) and all(run.spec.get(k) == v for k, v in match.items()):
            yield run


# ---- a stored run's identity and its summary recomputed from the rows ------------------------------------
IDENTITY = (
    "model",
    "dataset",
    "method",
    "n_edits",
    "seed",
    "precision",
    "generation",
    "pool",
    "hparams_id",
    "overrides",
)
DEFAULT_POOL = "subset"  # what a run without a recorded pool drew from (pmet.experiments.locate records others)
_RUN_FIELDS = ("n_records", "ci_method", "confidence")  # written by the summarisers beside the metrics


def run_identity(spec: dict) -> tuple:
    """The fields that make two runs the same run (:data:`IDENTITY`), from a stored file's spec (or any dict with
    the same keys): the value precision as ``"float32"`` when none is given, the pool ``"subset"`` when none is
    recorded (runs written before pools were recorded drew from the subsets), overrides as sorted pairs."""
    over = tuple(sorted((spec.get("overrides") or {}).items()))
    return (
        spec.get("model"),
        spec.get("dataset"),
        spec.get("method"),
        None if spec.get("n_edits") is None else int(spec["n_edits"]),
        int(spec.get("seed") or 0),
        spec.get("precision") or spec.get("value_autocast") or "float32",
        bool(spec.get("generation")),
        spec.get("pool") or DEFAULT_POOL,
        None if spec.get("hparams_id") is None else str(spec["hparams_id"]),
        over,
    )


def _summariser(dataset: str):
    from .evaluation import CF_METRICS, ZSRE_METRICS, summarize_counterfact, summarize_zsre

    if dataset == "counterfact":
        return summarize_counterfact, [*CF_METRICS, "score"]
    if dataset == "zsre":
        return summarize_zsre, list(ZSRE_METRICS)
    raise ValueError(f"no summariser for dataset {dataset!r}")


def _is_metric_field(key: str, metrics) -> bool:
    return key in _RUN_FIELDS or any(key == m or key in (f"{m}_ci", f"{m}_n", f"{m}_ci_method") for m in metrics)


def recomputed_summary(run: StoredRun) -> dict:
    """``run``'s summary with every metric (mean, interval, record count, interval method) recomputed from its
    per-record rows by the experiments' own summariser; the run's other fields (spec, hyperparameters, timings,
    ‖Δ‖ per weight, and portability, whose per-record values the file does not hold) are the stored summary's."""
    summarize, metrics = _summariser(run.spec.get("dataset") or run.summary.get("dataset"))
    kept = {k: v for k, v in run.summary.items() if not _is_metric_field(k, metrics)}
    return finite({**kept, **summarize(run.rows)})  # as stored: a one-record run's NaN interval is None
