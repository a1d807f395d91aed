"""Read and write component hidden states with torch forward hooks.

A *site* is ``(component, layer)``:

=============  =======================================================================================
``"block"``    ``h^l``, output of block ``l``
``"attn"``     ``a^l``, output of the attention module (first element of its tuple), incl. ``W_O^MHSA``
``"mlp"``      ``m^l``, output of the FFN, incl. ``W_O^FFN``
``"mlp_key"``  input of ``W_O^FFN`` -- the key of Eq. 12 for FFN edits
``"attn_key"`` input of ``W_O^MHSA`` -- the key for the "w/ W_O^MHSA" ablation
``"embed"``    token embeddings (``layer`` is ignored; use 0)
=============  =======================================================================================

Example -- record ``m^3`` and add ``δ`` to ``a^5`` at position 7 of row 0, stopping after layer 5::

    with Trace(model, record=[("mlp", 3)], add={("attn", 5): Add([0], [7], delta[None])},
               stop_after=("block", 5)) as tr:
        model(**batch)
    m3 = tr["mlp", 3]          # [batch, seq, d_model]

Hooks are removed on exit, also when the forward pass raises. Gradients flow through added vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .layouts import Layout

Site = tuple[str, int]
OUTPUT_SITES = {"block": None, "attn": "attn", "mlp": "mlp"}
INPUT_SITES = {"mlp_key": "mlp_out", "attn_key": "attn_out"}


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by :class:`Trace`."""


@dataclass
class Add:
    """Add ``vectors[i]`` to the hidden state at ``(rows[i], positions[i])`` (out of place, autograd-safe)."""

    rows: torch.Tensor | list[int]
    positions: torch.Tensor | list[int]
    vectors: torch.Tensor  # [n, d]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(self.rows, device=x.device, dtype=torch.long)
        pos = torch.as_tensor(self.positions, device=x.device, dtype=torch.long)
        return x.index_put((rows, pos), self.vectors.to(x.dtype), accumulate=True)


Intervention = Callable[[torch.Tensor], torch.Tensor]


def site_module(model: nn.Module, layout: Layout, site: Site) -> tuple[nn.Module, bool]:
    """The module a site hooks and whether the site is its *input* (pre-hook) rather than its output."""
    component, layer = site
    if component == "embed":
        return layout.module(model, "embed"), False
    if component in OUTPUT_SITES:
        block = layout.block(model, layer)
        path = OUTPUT_SITES[component]
        return (block if path is None else block.get_submodule(getattr(layout, path))), False
    if component in INPUT_SITES:
        return layout.module(model, INPUT_SITES[component], layer), True
    raise ValueError(
        f"unknown site component {component!r}; use one of {sorted([*OUTPUT_SITES, *INPUT_SITES, 'embed'])}"
    )


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


class Trace:
    """Context manager recording and/or editing hidden states at sites (see module docstring).

    ``record``: sites whose tensor is stored (``detach=True`` stores a detached copy; ``False`` keeps the graph).
    ``add``: site -> :class:`Add` or any ``fn(tensor) -> tensor`` applied to the site's tensor.
    ``stop_after``: a site after which the forward pass stops (:class:`StopForward`); the model then
    returns nothing, so use this only when the recorded tensors are all you need.
    """

    def __init__(
        self,
        model: nn.Module,
        record: Iterable[Site] = (),
        add: Mapping[Site, Intervention] | None = None,
        stop_after: Site | None = None,
        detach: bool = True,
        layout: Layout | None = None,
    ):
        self.model = model
        self.layout = layout or model.layout
        self.record = [tuple(s) for s in record]
        self.add = {tuple(k): v for k, v in (add or {}).items()}
        self.stop_after = tuple(stop_after) if stop_after is not None else None
        self.detach = detach
        self.outputs: dict[Site, torch.Tensor] = {}
        self._handles: list = []

    def __getitem__(self, site: Site) -> torch.Tensor:
        return self.outputs[tuple(site)]

    def _hook(self, site: Site, is_input: bool):
        fn = self.add.get(site)
        keep = site in self.record
        stop = site == self.stop_after

        def apply(x: torch.Tensor) -> torch.Tensor:
            if fn is not None:
                x = fn(x)
            if keep:
                self.outputs[site] = x.detach() if self.detach else x
            if stop:
                raise StopForward
            return x

        if is_input:

            def pre_hook(module, args):
                new = apply(args[0])
                return (new, *args[1:]) if fn is not None else None

            return pre_hook

        def hook(module, args, out):
            new = apply(_first(out))
            return _replace_first(out, new) if fn is not None else None

        return hook

    def __enter__(self) -> Trace:
        sites = dict.fromkeys([*self.record, *self.add, *([self.stop_after] if self.stop_after else [])])
        try:
            for site in sites:
                module, is_input = site_module(self.model, self.layout, site)
                hook = self._hook(site, is_input)
                handle = module.register_forward_pre_hook(hook) if is_input else module.register_forward_hook(hook)
                self._handles.append(handle)
        except Exception:
            self.close()
            raise
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def run_until(model: nn.Module, site: Site, record: Iterable[Site] | None = None, **inputs) -> dict:
    """Run ``model(**inputs)`` only as far as ``site`` and return the recorded tensors (default: that site)."""
    record = list(record) if record is not None else [site]
    with Trace(model, record=record, stop_after=site) as tr:
        model(**inputs, use_cache=False)
    return tr.outputs
