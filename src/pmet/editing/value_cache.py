"""The on-disk cache of target values ``V1`` (Eq. 10): one safetensors entry per request.

Entries live under ``cache_dir/values/<model fingerprint>/`` and are keyed by a hash of everything that
changes a value: the model (fingerprint and a checksum of the weights edits write), the layer, the context
templates, the request and the value hyperparameters (:data:`VALUE_FIELDS`).
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

from .hparams import LATER_FIELDS, EditHparams

CACHE_VERSION = 1
VALUE_FIELDS = ("value_site", "optimize_attn_delta", "stop_rule", "v_lr", "v_num_grad_steps",
                "clamp_norm_factor", "v_weight_decay", "kl_factor", "nll_loss_factor", "phi_after_fit",
                "kl_stop", "loss_stop", "kl_prompt")
LATER_VALUE_FIELDS = ("v_autocast", "v_fast")  # enter the key only when set (keys of older caches stay valid)


def weights_checksum(model: nn.Module) -> str:
    """A cheap checksum of every block's W_O^FFN and W_O^MHSA (where edits are written), so values computed
    on an edited model are never confused with those of the original."""
    h = hashlib.sha256()
    layout = model.layout
    for l in range(layout.n_layers):
        for comp in ("mlp_out", "attn_out"):
            w = layout.module(model, comp, l).weight.detach().flatten()
            step = max(1, w.numel() // 4096)
            h.update(w[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def value_cache_key(model_id: dict, hp: EditHparams, layer: int, templates: list[str], request: dict) -> str:
    later = {f: getattr(hp, f) for f in LATER_VALUE_FIELDS if getattr(hp, f) != LATER_FIELDS[f]}
    if hp.v_autocast:
        later["attn"] = "eager"  # low-precision values are computed with eager attention (pmet.editing.values)
    payload = {"v": CACHE_VERSION, **model_id, "layer": layer, "templates": templates,
               "hp": {**{f: getattr(hp, f) for f in VALUE_FIELDS}, **later},
               "request": {k: request[k] for k in ("prompt", "subject", "target_new")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
