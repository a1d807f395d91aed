"""Running a model from layer ``L`` on: model surgery for the value optimisation of Eq. 10.

Eq. 10's δ's sit at layer ``L``; everything below ``L`` is constant while they are optimised. So the model
runs once up to block ``L`` without gradients (:func:`block_input` keeps ``h^{L-1}``), and every
optimisation step runs only blocks ``L..end`` on it (:func:`forward_from_layer`), by temporarily slicing
the base model's block list (:func:`layers_from`).
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

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


def forward_from_layer(
    model: nn.Module, h_prev: torch.Tensor, start: int, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Blocks ``start..end`` and the final norm on ``h_prev`` (the input of block ``start``):
    returns the last hidden state ``[batch, seq, d]`` (before the unembedding)."""
    with layers_from(model, start) as base:
        out = base(
            inputs_embeds=h_prev, attention_mask=attention_mask, position_ids=positions(attention_mask), use_cache=False
        )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
@contextmanager
def block_input_capture(block: nn.Module):
    """Within the ``with``, ``captured["h"]`` becomes the (detached) hidden state ``block`` is called with."""
    captured = {}

    def pre_hook(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def block_input(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int, record=()
) -> tuple[torch.Tensor, dict]:
    """Run the model up to block ``layer``'s output, returning its input ``h^{layer-1}`` and the tensors at
    the ``record`` sites (all at ``layer`` or before)."""
    block = model.layout.block(model, layer)
    with block_input_capture(block) as captured, Trace(model, record=list(record), stop_after=("block", layer)) as tr:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions(attention_mask),
            use_cache=False,
        )
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


def low_precision_blocks(model: nn.Module, start: int, dtype: torch.dtype) -> list[nn.Module]:
    """Copies of blocks ``start..end`` whose matrices (parameters with 2+ dimensions: linear and Conv1D
    weights) are cast to ``dtype`` once; vectors (norm weights, biases) stay as they are, and the copies
    share the model's config objects (so :func:`attention_implementation` still reaches them).

    Under ``torch.autocast(dtype)`` a copy computes exactly what the original computes (autocast casts a
    matrix to ``dtype`` with the same rounding at every use, forward and backward); it only saves those
    casts. The originals are not touched."""
    base, attr = _base_model(model)
    memo = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None:
            memo[id(cfg)] = cfg
    blocks = []
    for block in list(getattr(base, attr))[start:]:
        twin = copy.deepcopy(block, memo)
        for p in twin.parameters():
            p.requires_grad_(False)
            if p.dim() >= 2:
                p.data = p.data.to(dtype)
        blocks.append(twin)
    return blocks


@contextmanager
def swapped_blocks(model: nn.Module, start: int, blocks: list[nn.Module] | None):
    """Temporarily replace blocks ``start..end`` of ``model`` with ``blocks`` (e.g. from
    :func:`low_precision_blocks`), so that layout paths (``model.layers.12.mlp``) and hooks reach the copies.
    ``blocks=None`` leaves the model as it is."""
    if blocks is None:
        yield
        return
    base, attr = _base_model(model)
    orig = getattr(base, attr)
    if len(orig) - start != len(blocks):
        raise ValueError(f"{len(blocks)} replacement blocks for blocks {start}..{len(orig) - 1}")
    setattr(base, attr, nn.ModuleList(list(orig)[:start] + list(blocks)))
    try:
        yield
    finally:
        setattr(base, attr, orig)


@dataclass
class Prefix:
    """The keys and values of constant prefix columns at every layer (a transformers cache of ``c``
    columns) and their padding mask ``[N, c]`` (left padding), for :func:`forward_from_layer`."""

    cache: object
    mask: torch.Tensor

    def rows(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> Prefix:
        """The prefix of ``rows`` only (and its keys/values cast to ``dtype``)."""
        cache = copy.copy(self.cache)
        cache.layers = []
        for layer in self.cache.layers:
            twin = copy.copy(layer)
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                twin.keys, twin.values = layer.keys[rows], layer.values[rows]
                if dtype is not None:
                    twin.keys, twin.values = twin.keys.to(dtype), twin.values.to(dtype)
            cache.layers.append(twin)
        return Prefix(cache, self.mask[rows])

    def fresh_cache(self):
        """A cache holding the prefix that a forward pass may extend without touching this one (the
        layers' ``update`` concatenates into new tensors)."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        return cache


@torch.no_grad()
def prefix_state(
    model: nn.Module,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    suffix_ids: torch.Tensor,
    suffix_mask: torch.Tensor,
    layer: int,
    record=(),
) -> tuple[torch.Tensor, dict, Prefix] | None:
    """One pass of ``prefix ⊕ suffix`` (left-padded prefix, right-padded suffix, real positions): returns
    the input ``h^{layer-1}`` of block ``layer`` at the suffix columns, the tensors at the ``record`` sites
    (suffix columns only) and the :class:`Prefix` (keys and values of the prefix columns at every layer).

    ``None`` where the model's cache is not a list of plain growing layers (sliding-window layers, e.g.
    Gemma-3's, keep only part of the past): the caller then runs the whole rows."""
    c = prefix_ids.shape[1]
    ids, mask = torch.cat([prefix_ids, suffix_ids], 1), torch.cat([prefix_mask, suffix_mask], 1)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    block = model.layout.block(model, layer)
    with block_input_capture(block) as captured, Trace(model, record=list(record)) as tr:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or any(type(l).__name__ != "DynamicLayer" for l in layers):
        return None
    for l in layers:  # keep the prefix columns
        l.keys, l.values = l.keys[:, :, :c], l.values[:, :, :c]
    rec = {site: t[:, c:] for site, t in tr.outputs.items()}
    return captured["h"][:, c:], rec, Prefix(cache, prefix_mask)


def forward_from_prefix(
    model: nn.Module, h_prev: torch.Tensor, start: int, attention_mask: torch.Tensor, prefix: Prefix
) -> torch.Tensor:
    """:func:`forward_from_layer` for suffix columns whose prefix is ``prefix`` (keys/values at every layer):
    ``h_prev`` ``[N, s, d]`` and ``attention_mask`` ``[N, s]`` cover the suffix only."""
    c = prefix.mask.shape[1]
    s = h_prev.shape[1]
    mask = torch.cat([prefix.mask, attention_mask], 1)
    pos = prefix.mask.sum(1, keepdim=True) + torch.arange(s, device=h_prev.device)
    with layers_from(model, start) as base:
        # transformers >= 5.2x names the argument ``cache`` (``past_key_values`` is deprecated there)
        name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        out = base(
            inputs_embeds=h_prev,
            attention_mask=mask,
            position_ids=pos,
            **{name: prefix.fresh_cache()},
            cache_position=torch.arange(c, c + s, device=h_prev.device),
            use_cache=True,
        )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
