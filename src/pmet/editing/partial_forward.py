"""Running a model from layer ``L`` on: model surgery for the value optimisation of Eq. 10.

Eq. 10's δ's sit at layer ``L``; everything below ``L`` is constant while they are optimised. So the model
runs once up to block ``L`` without gradients (:func:`block_input` keeps ``h^{L-1}``), and every
optimisation step runs only blocks ``L..end`` on it (:func:`forward_from_layer`), by temporarily slicing
the base model's block list (:func:`layers_from`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..hooks import Trace


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``0..t-1`` for every row (right padding: real tokens start at 0)."""
    n, t = attention_mask.shape
    return torch.arange(t, device=attention_mask.device).unsqueeze(0).expand(n, t)


def _base_model(model: nn.Module) -> tuple[nn.Module, str]:
    parent_path, attr = model.layout.layers.rsplit(".", 1)
    return model.get_submodule(parent_path), attr


@contextmanager
def layers_from(model: nn.Module, start: int):
    """Temporarily make the base model's block list ``layers[start:]`` (and zero GPT-2's learned position
    embedding, which the base model would add to ``inputs_embeds``; embedding scales such as Gemma's live
    in the embedding module, which ``inputs_embeds`` bypasses). Yields the base model, which then
    maps ``inputs_embeds = h^{start-1}`` to the final-normed last hidden state."""
    base, attr = _base_model(model)
    orig = getattr(base, attr)
    handles = []
    wpe = getattr(base, "wpe", None) if model.layout.family == "gpt2" else None
    if wpe is not None:
        handles.append(wpe.register_forward_hook(lambda m, i, o: torch.zeros_like(o)))
    # Models that look up per-layer settings by position in the list (Gemma-3's config.layer_types:
    # sliding vs full attention, local vs global rotary) see the same slice.
    cfg = base.config
    layer_types = getattr(cfg, "layer_types", None)
    slice_types = isinstance(layer_types, (list, tuple)) and len(layer_types) == len(orig)
    try:
        setattr(base, attr, nn.ModuleList(list(orig)[start:]))
        if slice_types:
            cfg.layer_types = list(layer_types)[start:]
        yield base
    finally:
        setattr(base, attr, orig)
        if slice_types:
            cfg.layer_types = layer_types
        for h in handles:
            h.remove()


def forward_from_layer(model: nn.Module, h_prev: torch.Tensor, start: int, attention_mask: torch.Tensor
                       ) -> torch.Tensor:
    """Blocks ``start..end`` and the final norm on ``h_prev`` (the input of block ``start``):
    returns the last hidden state ``[batch, seq, d]`` (before the unembedding)."""
    with layers_from(model, start) as base:
        out = base(inputs_embeds=h_prev, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def block_input(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                record=()) -> tuple[torch.Tensor, dict]:
    """Run the model up to block ``layer``'s output, returning its input ``h^{layer-1}`` and the tensors at
    the ``record`` sites (all at ``layer`` or before)."""
    block = model.layout.block(model, layer)
    captured = {}

    def pre_hook(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with Trace(model, record=list(record), stop_after=("block", layer)) as tr:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                  use_cache=False)
    finally:
        handle.remove()
    return captured["h"], dict(tr.outputs)


@contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Run ``model``'s attention as ``name`` (a transformers attention implementation) inside the block,
    restoring the previous one on exit. Models without ``set_attn_implementation`` are left as they are."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before is None or before == name or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
