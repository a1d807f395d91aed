"""Per-record evaluation results as JSON Lines, appended and flushed per batch, resumable.

File format: an optional first line ``{"_meta": {...}}`` (what produced the file: dataset, whether
generation metrics were computed, ...) followed by one JSON object per record with a ``case_id``.
Opening an existing file checks that its meta agrees with the caller's on the keys both give (a file
written without generation cannot be resumed with generation, or vice versa) and drops a trailing
partial line left by an interrupted write. ``done_ids()`` are the case_ids to skip when resuming.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["ResultsFile", "load_results"]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return None if math.isnan(f) or math.isinf(f) else f
    return x


class ResultsFile:
    """Append-only JSON Lines file of per-record results (one per ``case_id``)."""

    def __init__(self, path: str | os.PathLike, meta: dict | None = None):
        self.path = Path(path)
        self.meta = dict(meta or {})
        self._rows: dict = {}
        if self.path.exists():
            file_meta, rows = self._read_and_repair()
            clash = {k: (file_meta[k], v) for k, v in self.meta.items() if k in file_meta and file_meta[k] != v}
            if clash:
                raise ValueError(
                    f"{self.path} was written with different settings {clash} (file, now); "
                    "use another out_path or delete the file to start over"
                )
            self.meta = {**file_meta, **self.meta}
            for r in rows:
                self._rows[r["case_id"]] = r
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                if self.meta:
                    f.write(json.dumps({"_meta": _jsonable(self.meta)}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def _read_and_repair(self) -> tuple[dict, list[dict]]:
        raw = self.path.read_bytes()
        good_end = raw.rfind(b"\n") + 1  # everything after the last newline is a partial write
        if good_end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        return _parse_lines(raw[:good_end].decode("utf-8"))

    def done_ids(self) -> set:
        return set(self._rows)

    def rows(self) -> list[dict]:
        return list(self._rows.values())

    def get(self, case_id):
        return self._rows.get(case_id)

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows (one line each) and flush + fsync, so a crash loses at most the current batch."""
        rows = [_jsonable(r) for r in rows]
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self._rows[r["case_id"]] = r


def load_results(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``(meta, rows)`` of a results file (a trailing partial line is ignored, the file is not modified)."""
    text = Path(path).read_text(encoding="utf-8")
    return _parse_lines(text[: text.rfind("\n") + 1])


def _parse_lines(text: str) -> tuple[dict, list[dict]]:
    """``(meta, rows)`` from complete JSON Lines (the ``_meta`` line, then one row per line)."""
    meta, rows = {}, []
    for line in text.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "_meta" in obj:
            meta = obj["_meta"]
        else:
            rows.append(obj)
    return meta, rows


def evaluate_resumable(
    records, score_batch, batch_size: int, store: ResultsFile | None, desc: str, progress: bool = True
) -> list[dict]:
    """The loop both evaluations share: skip records already in ``store``, score the rest ``batch_size``
    at a time with ``score_batch(chunk) -> rows`` (one row per record, with ``case_id``), time them,
    append each batch to ``store`` as it finishes, and return one row per record in ``records`` order."""
    import time

    from tqdm.auto import tqdm

    done = store.done_ids() if store is not None else set()
    todo = [r for r in records if r.case_id not in done]
    new_rows: dict = {}
    with tqdm(total=len(todo), desc=desc, unit="rec", disable=not (progress and todo)) as bar:
        for b0 in range(0, len(todo), batch_size):
            chunk = todo[b0 : b0 + batch_size]
            t0 = time.perf_counter()
            rows = score_batch(chunk)
            dt = (time.perf_counter() - t0) / max(len(chunk), 1)
            for row in rows:
                row["eval_seconds"] = dt
                new_rows[row["case_id"]] = row
            if store is not None:
                store.append(rows)
            bar.update(len(chunk))
    return [new_rows.get(r.case_id) or (store.get(r.case_id) if store is not None else None) for r in records]
