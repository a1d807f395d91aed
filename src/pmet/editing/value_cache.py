"""The on-disk cache of target values ``V1`` (Eq. 10): one safetensors entry per request.

Entries live under ``cache_dir/values/<model fingerprint>/`` and are keyed by a hash of everything that
changes a value: the model (fingerprint and a checksum of the weights edits write), the layer, the context
templates, the request and the value hyperparameters (:data:`VALUE_FIELDS`). Each entry's info also records
``batch_keys``, the keys of the batch it was optimised in (:func:`resume_batches`); it is not part of the key.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

from .hparams import LATER_FIELDS, EditHparams

CACHE_VERSION = 1
VALUE_FIELDS = (
    "value_site",
    "optimize_attn_delta",
    "stop_rule",
    "v_lr",
    "v_num_grad_steps",
    "clamp_norm_factor",
    "v_weight_decay",
    "kl_factor",
    "nll_loss_factor",
    "phi_after_fit",
    "kl_stop",
    "loss_stop",
    "kl_prompt",
)
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
    payload = {
        "v": CACHE_VERSION,
        **model_id,
        "layer": layer,
        "templates": templates,
        "hp": {**{f: getattr(hp, f) for f in VALUE_FIELDS}, **later},
        "request": {k: request[k] for k in ("prompt", "subject", "target_new")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def resume_batches(keys: list, mates: list, todo: list[int]) -> list[list[int]]:
    """The batches that recompute missing values in the composition they were first computed in.

    A request's value depends, in its last bits (and after the optimisation's steps, ~1e-4 relative), on the
    other requests in its batch (padding lengths change the order of floating-point sums), so a value missing
    from a batch that was partly saved (a run killed while it wrote the batch's entries) or partly discarded
    (a corrupt entry) is recomputed with the same batch-mates, in the same order, as the cached entries of that
    batch record (``batch_keys``): the result is then bit for bit that of an uninterrupted run. Only batches
    whose members are all among ``keys`` can be rebuilt; other missing values are batched as usual."""
    index = {}
    for i, k in enumerate(keys):
        index.setdefault(k, i)
    missing, out, covered = set(todo), [], set()
    for recorded in mates:
        if not recorded or not all(k in index for k in recorded):
            continue
        batch = [index[k] for k in recorded]
        if any(i in missing and i not in covered for i in batch):
            out.append(batch)
            covered.update(batch)
    return out
