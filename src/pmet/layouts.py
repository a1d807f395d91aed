"""Architecture layouts: where each piece of the paper's notation lives in a transformers model.

Every other module reaches into a model only through a :class:`Layout`, so an architecture is described
exactly once, as data. Module paths are relative to the model (``layers``, ``final_norm``, ``unembed``,
``embed``) or to one block (``attn``, ``attn_out``, ``mlp``, ``mlp_out``, ``mlp_in``).

Notation (paper, Eqs. 1-2):

* ``h^l``  block output (residual stream after layer ``l``)
* ``a^l``  attention (MHSA) output, the output of ``attn``; it already includes ``W_O^MHSA`` (``attn_out``)
* ``m^l``  FFN output, the output of ``mlp``; it already includes ``W_O^FFN`` (``mlp_out``)
* key ``k^l`` (Eq. 12) for ``W_O^FFN`` = the input of ``mlp_out``, i.e. ``σ(W_I γ(h^{l-1}))`` (or the gated
  ``σ(W_gate x) * (W_up x)`` of Llama); for ``W_O^MHSA`` the input of ``attn_out`` (concatenated heads).

For GPT-J, NeoX, GPT-2 and Llama ``h^l = h^{l-1} + a^l + m^l`` holds exactly: in parallel blocks (GPT-J,
NeoX with ``use_parallel_residual``) both read ``h^{l-1}``; in sequential blocks (GPT-2, Llama) the FFN
reads ``h^{l-1} + a^l``.

Gemma-3 normalises each component's output before the residual add:
``h^l = h^{l-1} + γ_a(a^l) + γ_m(m^l)`` (``attn_post_norm``, ``mlp_post_norm``). We keep ``a^l`` / ``m^l``
as the outputs of W_O^MHSA / W_O^FFN (before those norms): that is the vector the edited weight produces,
so the key -> value relation ``v = W k`` of Eq. 8/9 stays linear, and δ^a / δ^m are added there. The
effect of δ on the residual then passes through the post-norm, which the value optimisation sees because
it runs the real forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    """One architecture family's module names and conventions."""

    family: str
    layers: str  # ModuleList of blocks
    embed: str  # token embedding
    attn: str  # block-relative: module whose (first) output is a^l
    attn_out: str  # block-relative: W_O^MHSA
    mlp: str  # block-relative: module whose output is m^l
    mlp_out: str  # block-relative: W_O^FFN
    mlp_in: str  # block-relative: W_I (first FFN projection, for documentation and analyses)
    final_norm: str  # γ before the unembedding
    unembed: str  # W_E of Eq. 1 (lm_head)
    parallel: bool  # attention and FFN both read h^{l-1}
    conv1d: bool = False  # GPT-2 style Conv1D weights stored as [in, out]
    attn_post_norm: str = ""  # block-relative norm applied to a^l before the residual add (Gemma-3)
    mlp_post_norm: str = ""  # block-relative norm applied to m^l before the residual add (Gemma-3)
    critical_layers: tuple[int, ...] = ()  # default R for MEMIT/PMET (L = max R)
    n_layers: int = 0  # filled in by layout_for(model)

    # ---- module access -------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer]

    def module(self, model: nn.Module, component: str, layer: int | None = None) -> nn.Module:
        """``component`` is a Layout field name (``"attn"``, ``"mlp_out"``, ``"final_norm"`` ...)."""
        path = getattr(self, component)
        if component in {"layers", "embed", "final_norm", "unembed"}:
            return model.get_submodule(path)
        if not path:
            raise ValueError(f"layout {self.family!r} has no {component!r}")
        if layer is None:
            raise ValueError(f"component {component!r} needs a layer index")
        return self.block(model, layer).get_submodule(path)

    def residual_contribution(self, model: nn.Module, component: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What ``a^l`` (component ``"attn"``) or ``m^l`` (``"mlp"``) adds to the residual stream."""
        norm = self.attn_post_norm if component == "attn" else self.mlp_post_norm
        return self.block(model, layer).get_submodule(norm)(x) if norm else x

    def weight_name(self, component: str, layer: int) -> str:
        """Full parameter name of a block linear's weight, e.g. ``transformer.h.8.mlp.fc_out.weight``."""
        return f"{self.layers}.{layer}.{getattr(self, component)}.weight"

    # ---- weight orientation (the one place Conv1D vs Linear is handled) -------------------------------
    def get_weight(self, model: nn.Module, component: str, layer: int) -> torch.Tensor:
        """``W`` as a ``[d_out, d_in]`` matrix (a view), so that ``v = W k`` as in the paper."""
        w = self.module(model, component, layer).weight
        return w.T if self.conv1d else w

    def add_to_weight(self, model: nn.Module, component: str, layer: int, delta: torch.Tensor) -> None:
        """``W <- W + Δ`` in place, with ``Δ`` given as ``[d_out, d_in]``."""
        w = self.module(model, component, layer).weight
        with torch.no_grad():
            w.add_((delta.T if self.conv1d else delta).to(device=w.device, dtype=w.dtype))


LAYOUTS: dict[str, Layout] = {
    "gptj": Layout(
        family="gptj",
        layers="transformer.h",
        embed="transformer.wte",
        attn="attn",
        attn_out="attn.out_proj",
        mlp="mlp",
        mlp_out="mlp.fc_out",
        mlp_in="mlp.fc_in",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        parallel=True,
        critical_layers=(3, 4, 5, 6, 7, 8),  # paper, Appendix D
    ),
    "gpt_neox": Layout(
        family="gpt_neox",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        attn="attention",
        attn_out="attention.dense",
        mlp="mlp",
        mlp_out="mlp.dense_4h_to_h",
        mlp_in="mlp.dense_h_to_4h",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        parallel=True,
        critical_layers=(6, 7, 8, 9, 10),  # paper, Appendix D
    ),
    "gpt2": Layout(
        family="gpt2",
        layers="transformer.h",
        embed="transformer.wte",
        attn="attn",
        attn_out="attn.c_proj",
        mlp="mlp",
        mlp_out="mlp.c_proj",
        mlp_in="mlp.c_fc",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        parallel=False,
        conv1d=True,
        critical_layers=(13, 14, 15, 16, 17),  # MEMIT's GPT-2 XL layers
    ),
    "llama": Layout(
        family="llama",
        layers="model.layers",
        embed="model.embed_tokens",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_out="mlp.down_proj",
        mlp_in="mlp.up_proj",
        final_norm="model.norm",
        unembed="lm_head",
        parallel=False,
        critical_layers=(),  # per model: see models.MODEL_SPECS (smollm2 by causal tracing)
    ),
}

LAYOUTS["gemma3"] = Layout(
    family="gemma3",
    layers="model.layers",
    embed="model.embed_tokens",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    mlp_out="mlp.down_proj",
    mlp_in="mlp.up_proj",
    final_norm="model.norm",
    unembed="lm_head",
    parallel=False,
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    critical_layers=(),  # per model: gemma3-270m by causal tracing
)

_MODEL_TYPE_TO_FAMILY = {
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2",
    "llama": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


def layout_for(model: nn.Module, critical_layers: tuple[int, ...] | None = None) -> Layout:
    """The layout of ``model``'s architecture family with ``n_layers`` filled in.

    ``critical_layers`` overrides the family default (e.g. the causal-tracing choice for smollm2).
    """
    model_type = model.config.model_type
    family = _MODEL_TYPE_TO_FAMILY.get(model_type)
    if family is None:
        known = ", ".join(sorted(_MODEL_TYPE_TO_FAMILY))
        raise NotImplementedError(
            f"no pmet layout for model_type={model_type!r}; known families: {known}. "
            "Add a Layout to pmet.layouts.LAYOUTS describing its module names."
        )
    layout = LAYOUTS[family]
    if family == "gpt_neox" and not getattr(model.config, "use_parallel_residual", True):
        layout = replace(layout, parallel=False)
    if family == "gpt2" and getattr(model, "lm_head", None) is None:
        raise NotImplementedError("GPT-2 layout expects a GPT2LMHeadModel")
    n = len(model.get_submodule(layout.layers))
    crit = tuple(critical_layers) if critical_layers is not None else layout.critical_layers
    crit = tuple(l for l in crit if l < n) or _default_critical_layers(n)
    return replace(layout, n_layers=n, critical_layers=crit)


def _default_critical_layers(n_layers: int) -> tuple[int, ...]:
    """Fallback for models without a traced choice: the 5 layers from ~1/7 of the depth (GPT-J: 4..8 of 28)."""
    start = max(1, n_layers // 7)
    return tuple(range(start, min(n_layers, start + 5)))
