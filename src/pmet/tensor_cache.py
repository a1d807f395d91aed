"""One small safetensors cache used by every cached tensor in pmet (key statistics, value vectors).

A cache file holds named tensors plus two metadata strings: ``key`` (everything that determines the
tensors, serialised; a file whose key differs is treated as a miss) and ``info`` (JSON diagnostics).
Writes go to a temporary file that is moved into place, so a killed run never leaves a half-written
entry; an unreadable or non-finite entry is reported with a warning and recomputed by the caller.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch


def load_entry(path: Path, key: str, names=()) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, info)`` if ``path`` holds a valid entry for ``key`` (with at least ``names``), else None."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        wanted = list(names) or list(tensors)
        if meta.get("key") == key and set(wanted) <= set(tensors) and all(
                bool(torch.isfinite(tensors[n]).all()) for n in wanted):
            return tensors, json.loads(meta.get("info", "{}"))
        reason = "its key does not match or it holds non-finite values"
    except Exception as exc:  # any unreadable file is a miss
        reason = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"recomputing corrupt cache entry {path} ({reason})", stacklevel=2)
    return None


def save_entry(path: Path, tensors: dict[str, torch.Tensor], key: str, info: dict | None = None) -> None:
    """Write an entry atomically; a failure to write (read-only cache, full disk) only warns."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp),
                  metadata={"key": key, "info": json.dumps(info or {})})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write cache entry {path}: {exc}", stacklevel=2)
