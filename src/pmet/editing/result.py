"""What every editor returns (:class:`EditResult`) and the error of an editor that cannot run here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class MethodUnavailable(FileNotFoundError):
    """An editor cannot run here because something it needs was never produced (e.g. MEND's trained
    hypernetwork for this model, or a hyperparameter file); the message says how to produce it."""


@dataclass
class EditResult:
    """What an edit did. Tensors are on the CPU; ``deltas`` are ``[d_out, d_in]`` (``v = W k``)."""

    method: str
    hparams: Any  # the editor's hyperparameter dataclass
    layers: tuple[int, ...]
    requests: list[dict]
    deltas: dict[str, torch.Tensor]  # weight name -> Δ
    values: dict[str, torch.Tensor]  # value site ("mlp", "attn" or "block") -> V1 [n, d]
    keys: dict[str, torch.Tensor]  # weight name -> K1 [n, d_in] (rows)
    stats: dict[str, torch.Tensor]  # weight name -> E[kk^T] (C0 = λ · this)
    residuals: dict[str, torch.Tensor]  # weight name -> spread residual R^l [d_out, n] (float64)
    residual_norms: dict[str, float]  # weight name -> mean ||R|| (before spreading) when it was updated
    value_info: list[dict]  # per request: steps, final loss terms, norms, cached
    context_templates: list[list[str]]
    timings: dict[str, float]
    _model: nn.Module = field(repr=False, default=None)
    _originals: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    restored: bool = False  # restore() was called (a saved edit refuses a restored result)

    def restore(self) -> None:
        """Put the original weights of every edited module back, bit for bit."""
        with torch.no_grad():
            for name, w0 in self._originals.items():
                self._model.get_parameter(name).copy_(w0)
        self.restored = True

    def save(self, path: str | Path, check: bool = True) -> Path:
        """Write this edit to the folder ``path`` (post-edit weights + JSON manifest) so that
        :func:`pmet.load_edit` can re-apply it bit for bit; see :mod:`pmet.editing.saved`."""
        from .saved import save_edit  # saved.py builds on this module

        return save_edit(self, path, check=check)
