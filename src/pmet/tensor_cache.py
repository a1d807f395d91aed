"""One small safetensors cache used by every cached tensor in pmet (key statistics, value vectors, edited weights).

A cache file holds named tensors plus metadata strings: ``key`` (everything that determines the tensors,
serialised; a file whose key differs is treated as a miss), ``info`` (JSON diagnostics) and ``sha256`` (a
checksum of the stored tensors: names, dtypes, shapes and bytes; :func:`tensors_checksum`). Writes go to a
temporary file that is moved into place, so a killed run never leaves a half-written entry. Every load
checks the checksum, so an entry whose tensors were changed after it was written (a value vector
overwritten with zeros, finite but wrong) is reported with a warning naming the file and recomputed by the
caller, never used; so is an unreadable or non-finite entry.

Entries written before checksums existed (no ``sha256`` in their metadata) stay valid: cache keys (which
file a request maps to) are unchanged, and such an entry is used as before (key and finiteness checked, the
content unverified). It is not rewritten on load; an entry that is recomputed, or a cache folder that is
deleted and filled again, gets checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
        if meta.get("key") != key or not set(wanted) <= set(tensors):
            reason = "its key or tensor names do not match"
        elif "sha256" in meta and tensors_checksum(tensors) != meta["sha256"]:
            reason = "its tensors do not match the checksum stored with them: the file was changed after it was written"
        elif not all(bool(torch.isfinite(tensors[n]).all()) for n in wanted):
            reason = "it holds non-finite values"
        else:
            return tensors, json.loads(meta.get("info", "{}"))
    except Exception as exc:  # any unreadable file is a miss
        reason = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"recomputing corrupt cache entry {path} ({reason})", stacklevel=2)
    return None


def save_entry(path: Path, tensors: dict[str, torch.Tensor], key: str, info: dict | None = None) -> None:
    """Write an entry (with the checksum of its tensors) atomically; a failure to write (read-only cache,
    full disk) only warns."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        save_file(
            stored, str(tmp), metadata={"key": key, "info": json.dumps(info or {}), "sha256": tensors_checksum(stored)}
        )
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write cache entry {path}: {exc}", stacklevel=2)
