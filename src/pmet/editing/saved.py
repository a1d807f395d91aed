"""Saved edits: write what an edit did to a folder, re-apply it later bit for bit, undo it.

An edit is saved as two files in a folder:

``weights.safetensors``
    the **post-edit value of every edited weight**, as the model stores it (its own dtype, and its own
    orientation: ``[d_out, d_in]`` for ``nn.Linear``, ``[d_in, d_out]`` for GPT-2's Conv1D). Storing
    ``W0 + Δ`` rather than ``Δ`` is what makes re-applying exact: ``W0 + Δ`` rounded to the weight's dtype
    is not in general ``W0 + round(W1 - W0)`` (float addition does not undo float subtraction: after FT-W on
    tiny-llama 40-50% of the entries differ, in float32 and in bfloat16; PMET's small Δ happened to be exact
    there). The Δ is still there to read: ``SavedEdit.apply`` returns an
    :class:`~pmet.editing.result.EditResult` whose ``deltas`` are ``W1 - W0`` (float32, ``[d_out, d_in]``).
``manifest.json``
    what the edit was and what it may be applied to: format version, method, hyperparameters
    (``to_dict``), the requests, the critical layers, the model's fingerprint
    (:func:`pmet.models.model_fingerprint` of the model *before* the edit), the key statistics' fingerprint
    (sha256 of each ``E[kk^T]`` the update used, with the hparams' ``mom2_*`` settings; ``null`` for editors
    that use none, FT-W and MEND), per weight its name, shape, dtype, orientation and the sha256 of its bytes
    before and after the edit, the pmet / torch / transformers versions and the creation time (UTC).

The sha256 of the post-edit tensors are checked when the folder is loaded (a changed weights file is
refused), and the safetensors metadata carries the sha256 of the manifest's content (a changed manifest is
refused). This detects corruption and careless edits of either file, not a forger who rewrites both.

:meth:`SavedEdit.apply` refuses, with one line, a model whose fingerprint differs from the one the edit was
made on, a model whose target weights are not bit for bit those the edit started from (another model, or
one edited since), and a model that already carries this edit. The fingerprint is that of the model the
edit was *made on*: a result of a later round of sequential editing applies on top of the earlier rounds.

>>> result = edit(model, tok, requests, method="pmet")
>>> result.save("edits/darrieux")               # right after the edit, before editing further
>>> result.restore()
>>> applied = load_edit("edits/darrieux").apply(model)   # model as edited, bit for bit
>>> applied.restore()                            # original weights back, bit for bit
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .baseline import make_result
from .registry import get_editor

FORMAT = "pmet-saved-edit"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MODEL_MANIFEST = "pmet_edit.json"  # written next to a save_pretrained model that carries an edit


class SavedEditError(ValueError):
    """A saved edit cannot be written, read or applied; the message says why in one line."""


# ---------------------------------------------------------------------------------------------- hashing
def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (bit-exact identity; works for bfloat16)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str).encode()


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's content (key order and whitespace do not matter)."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


# ---------------------------------------------------------------------------------------------- saving
def _orientation(model: nn.Module) -> str:
    layout = getattr(model, "layout", None)
    return "in_out" if layout is not None and layout.conv1d else "out_in"


def _as_out_in(w: torch.Tensor, orientation: str) -> torch.Tensor:
    return w.T if orientation == "in_out" else w


def _unedited_fingerprint(model: nn.Module, originals: dict[str, torch.Tensor]) -> str:
    """``model_fingerprint`` of the model the edit was made on: the fingerprint reads a few parameters,
    which may be edited ones, so the originals are put back while it is computed."""
    from ..models import model_fingerprint

    params = dict(model.named_parameters())
    edited = {n: params[n].detach().clone() for n in originals}
    try:
        with torch.no_grad():
            for n, w0 in originals.items():
                params[n].copy_(w0)
        return model_fingerprint(model)
    finally:
        with torch.no_grad():
            for n, w1 in edited.items():
                params[n].copy_(w1)


def _check_current_is_edit(
    name: str, w0: torch.Tensor, w1: torch.Tensor, delta: torch.Tensor, orientation: str
) -> None:
    """The weight now should be ``W0 + Δ`` up to the rounding of the in-place additions; anything further
    means the model was changed after the edit (another edit on top, a restore and re-edit ...)."""
    d = _as_out_in(w1.float() - w0.float(), orientation).cpu()
    if d.shape != delta.shape:
        raise SavedEditError(f"{name}: the edit's Δ has shape {tuple(delta.shape)}, the weight {tuple(d.shape)}")
    eps = torch.finfo(w1.dtype).eps if w1.dtype.is_floating_point else 0.0
    err = float((d - delta.float()).norm())
    tol = 1e-3 * float(delta.norm()) + 8 * eps * (float(w0.float().norm()) + float(delta.norm())) + 1e-12
    if not math.isfinite(err) or err > tol:
        raise SavedEditError(
            f"{name} no longer equals its original plus this edit's Δ (|W - W0 - Δ| = {err:.3g}): "
            "save an edit right after it is made, before the model is edited further"
        )


def build_manifest(
    result,
    weights_before: dict[str, str],
    weights_after: dict[str, torch.Tensor],
    model: nn.Module,
    orientation: str,
    fingerprint: str,
) -> dict:
    """The manifest of a saved edit (module docstring)."""
    import transformers

    from .. import __version__

    hp = result.hparams
    hp_dict = hp.to_dict() if hasattr(hp, "to_dict") else (dict(hp) if isinstance(hp, dict) else None)
    stats = getattr(result, "stats", None) or {}
    c0 = None
    if stats:
        c0 = {
            "stats_sha256": {n: tensor_sha256(s) for n, s in sorted(stats.items())},
            "settings": {k: v for k, v in sorted((hp_dict or {}).items()) if k.startswith("mom2_")},
        }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": result.method,
        "hparams": hp_dict,
        "hparams_class": f"{type(hp).__module__}.{type(hp).__qualname__}" if hp_dict is not None else None,
        "layers": [int(l) for l in result.layers],
        "requests": result.requests,
        "model": {"fingerprint": fingerprint, "name": getattr(model, "pmet_name", None), "class": type(model).__name__},
        "c0": c0,
        "weights": {
            n: {
                "shape": list(w.shape),
                "dtype": str(w.dtype).removeprefix("torch."),
                "orientation": orientation,
                "sha256_before": weights_before[n],
                "sha256_after": tensor_sha256(w),
            }
            for n, w in sorted(weights_after.items())
        },
        "versions": {"pmet": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return json.loads(json.dumps(manifest, default=str))  # as it will read back (tuples -> lists ...)


def save_edit(result, path: str | Path, check: bool = True) -> Path:
    """Write ``result`` (an :class:`~pmet.editing.result.EditResult` whose model still carries the edit) to
    the folder ``path`` (created; an earlier saved edit there is replaced): ``weights.safetensors`` with the
    post-edit weights and ``manifest.json`` (module docstring). ``check``: refuse when a weight is not its
    original plus the result's Δ (the model was edited further). Returns the folder."""
    from safetensors.torch import save_file

    model = getattr(result, "_model", None)
    originals = getattr(result, "_originals", None) or {}
    if model is None or not originals:
        raise SavedEditError("this result holds no model or no original weights: nothing to save")
    if result.restored:
        raise SavedEditError("this edit was restored: save it before calling restore()")
    params = dict(model.named_parameters())
    orientation = _orientation(model)
    after = {n: params[n].detach().clone().contiguous().cpu() for n in sorted(originals)}
    if check:
        for n, w1 in after.items():
            if n in result.deltas:
                _check_current_is_edit(n, originals[n].cpu(), w1, result.deltas[n], orientation)
    before = {n: tensor_sha256(originals[n]) for n in after}
    manifest = build_manifest(result, before, after, model, orientation, _unedited_fingerprint(model, originals))
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_m = folder / f".{WEIGHTS}.tmp{os.getpid()}", folder / f".{MANIFEST}.tmp{os.getpid()}"
    save_file(after, str(tmp_w), metadata={"format": FORMAT, "manifest_sha256": manifest_sha256(manifest)})
    tmp_m.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    os.replace(tmp_w, folder / WEIGHTS)
    os.replace(tmp_m, folder / MANIFEST)
    return folder


# ---------------------------------------------------------------------------------------------- loading
def _rebuild_hparams(manifest: dict):
    """The hyperparameter object the edit used, rebuilt from the manifest (its dict if that fails)."""
    d = manifest.get("hparams")
    if not isinstance(d, dict) or not manifest.get("hparams_class"):
        return d
    try:  # the method's class from the editor registry
        return get_editor(manifest["method"]).hparams_cls(**d)
    except Exception:  # an unknown method or a changed field: the dict still says what was used
        return d


class SavedEdit:
    """A saved edit read back by :func:`load_edit`: ``manifest`` (dict), ``weights`` (post-edit tensors on
    the CPU, the model's own dtype and orientation), ``path``; :meth:`apply` writes it into a model."""

    def __init__(self, path: Path, manifest: dict, weights: dict[str, torch.Tensor]):
        self.path, self.manifest, self.weights = path, manifest, weights

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def requests(self) -> list[dict]:
        return self.manifest["requests"]

    def __repr__(self) -> str:
        return (
            f"SavedEdit({str(self.path)!r}, method={self.method!r}, {len(self.requests)} request(s), "
            f"{len(self.weights)} weight(s), model {self.manifest['model']['fingerprint']})"
        )

    def check(self, model: nn.Module) -> None:
        """Raise :class:`SavedEditError` unless this edit can be applied to ``model`` as it is now."""
        from ..models import model_fingerprint

        where = f"saved edit {str(self.path)!r}"
        params = dict(model.named_parameters())
        spec = self.manifest["weights"]
        for n, s in spec.items():
            p = params.get(n)
            if p is None:
                raise SavedEditError(f"{where} edits {n}, which this model does not have")
            if list(p.shape) != s["shape"] or str(p.dtype).removeprefix("torch.") != s["dtype"]:
                raise SavedEditError(
                    f"{where}: {n} is {s['dtype']} {s['shape']} there, "
                    f"{str(p.dtype).removeprefix('torch.')} {list(p.shape)} in this model"
                )
        now = {n: tensor_sha256(params[n]) for n in spec}
        if all(now[n] == s["sha256_after"] for n, s in spec.items()):
            raise SavedEditError(f"{where} is already applied to this model")
        want, have = self.manifest["model"]["fingerprint"], model_fingerprint(model)
        if have != want:
            raise SavedEditError(
                f"{where} was made on model {self.manifest['model'].get('name')!r} (fingerprint "
                f"{want}); this model's fingerprint is {have}: refusing to apply"
            )
        for n, s in spec.items():
            if now[n] != s["sha256_before"]:
                raise SavedEditError(
                    f"{where}: {n} is not the weight the edit was made on (edited since?): refusing to apply"
                )

    def apply(self, model: nn.Module):
        """Write the edit into ``model`` in place (after :meth:`check`); the weights become bit for bit those
        right after the original edit. Returns an :class:`~pmet.editing.result.EditResult` with ``method``,
        ``hparams``, ``layers``, ``requests`` and ``deltas`` (``W1 - W0``, float32, ``[d_out, d_in]``) whose
        ``restore()`` puts the weights the model had before back, bit for bit."""
        t0 = time.perf_counter()
        self.check(model)
        params = dict(model.named_parameters())
        originals = {n: params[n].detach().clone() for n in self.weights}
        deltas = {}
        with torch.no_grad():
            for n, w1 in self.weights.items():
                params[n].copy_(w1)
                orient = self.manifest["weights"][n]["orientation"]
                deltas[n] = _as_out_in(w1.float() - originals[n].float().cpu(), orient).contiguous()
        return make_result(
            self.method,
            model,
            originals,
            deltas,
            hparams=_rebuild_hparams(self.manifest),
            layers=tuple(self.manifest["layers"]),
            requests=list(self.requests),
            timings={"total": time.perf_counter() - t0},
        )


def load_edit(path: str | Path) -> SavedEdit:
    """Read a saved edit (a folder written by :meth:`EditResult.save <pmet.editing.editor.EditResult.save>`)
    and verify it: the format, the sha256 of every stored weight, and the manifest against the hash the
    weights file carries. Raises :class:`SavedEditError` with one line when anything is off."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(path)
    mpath, wpath = folder / MANIFEST, folder / WEIGHTS
    if not mpath.is_file() or not wpath.is_file():
        raise SavedEditError(f"{str(folder)!r} is not a saved edit: it needs {MANIFEST} and {WEIGHTS}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SavedEditError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SavedEditError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SavedEditError(
            f"{mpath}: format version {manifest.get('format_version')} (this pmet reads {FORMAT_VERSION})"
        )
    try:
        with safe_open(str(wpath), "pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise SavedEditError(f"{wpath}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if meta.get("manifest_sha256") != manifest_sha256(manifest):
        raise SavedEditError(f"{mpath} does not match {WEIGHTS} (changed after saving?)")
    spec = manifest.get("weights") or {}
    if set(spec) != set(weights):
        raise SavedEditError(f"{wpath}: holds {sorted(weights)}, the manifest lists {sorted(spec)}")
    for n, w in weights.items():
        if tensor_sha256(w) != spec[n]["sha256_after"]:
            raise SavedEditError(f"{wpath}: {n} does not match its checksum (file damaged or changed)")
    return SavedEdit(folder, manifest, weights)


# ---------------------------------------------------------------------------------------------- models
def save_edited_model(model: nn.Module, tok, directory: str | Path, edit: Any = None) -> Path:
    """Write ``model`` as it is now (e.g. right after an edit) with ``save_pretrained`` (safetensors), and
    ``tok`` next to it, to ``directory``, so that ``transformers`` or ``pmet.load_model(directory)`` can load
    the edited model. ``edit`` (an ``EditResult`` or a :class:`SavedEdit`): its manifest is written as
    ``pmet_edit.json`` beside the weights, to say which edit the model carries."""
    if edit is not None and getattr(edit, "restored", False):
        raise SavedEditError("this edit was restored: the model no longer carries it")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(str(folder))
    if edit is not None:
        manifest = getattr(edit, "manifest", None)
        if manifest is None:  # an EditResult: the same manifest save_edit would write
            model_ = edit._model
            orientation = _orientation(model_)
            params = dict(model_.named_parameters())
            after = {n: params[n].detach() for n in edit._originals}
            before = {n: tensor_sha256(w) for n, w in edit._originals.items()}
            manifest = build_manifest(
                edit, before, after, model_, orientation, _unedited_fingerprint(model_, edit._originals)
            )
        (folder / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return folder
