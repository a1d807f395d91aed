"""FT-W: constrained fine-tuning of one FFN weight with weight decay (baseline of the MEMIT/PMET tables).

The weight ``W_O^FFN`` of one layer (``components``/``layer`` in the hyperparameters) is trained with Adam
to lower the NLL of ``target_new`` given the filled prompt, all requests batched together (the "mass"
setting: one fine-tuning run per batch of edits). The "-W" variant uses Adam's (L2) weight decay, whose
strength may follow MEMIT's power law in the number of edits, ``wd = n^a · exp(b)``. Optionally the change
is kept in an L∞ ball of radius ``norm_constraint`` around the original weights by clamping after every
step (Zhu et al. 2020, ROME's FT+L).

Differences from MEMIT ``baselines/ft/ft_main.py`` (documented in ``hparams/BASELINES.md``):

* only the named weight(s) are trained (MEMIT's GPT-J file matches every parameter of block 21 by the
  prefix ``transformer.h.21``); the PMET paper and our brief describe FT-W as editing ``W_O^FFN``;
* the loss is the teacher-forced NLL of every target token (MEMIT scores all target token ids at the last
  prompt position, which coincides for one-token targets).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .baseline import filled, make_result, restore_weights, snapshot, target_batch, target_nll, weight_delta
from .requests import normalize_requests
from .result import EditResult


# ---------------------------------------------------------------------------------------- FT-W
@dataclass(frozen=True)
class FTHparams:
    layers: tuple[int, ...] = (21,)
    components: tuple[str, ...] = ("mlp_out",)
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0  # used when wd_power_law is None
    wd_power_law: tuple[float, float] | None = (-0.87028798, 0.15589562)  # wd = n^a · exp(b) (MEMIT)
    norm_constraint: float | None = None  # L∞ radius around the original weights (None: no clamp)
    batch_size: int = 64
    loss_stop: float = 1e-2  # MEMIT: skip a step below it, stop when the epoch mean is below it

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        object.__setattr__(self, "components", tuple(self.components))
        if self.wd_power_law is not None:
            object.__setattr__(self, "wd_power_law", tuple(float(x) for x in self.wd_power_law))
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ValueError("norm_constraint must be positive or null")

    def decay(self, n_requests: int) -> float:
        if self.wd_power_law is None:
            return float(self.weight_decay)
        a, b = self.wd_power_law
        return float(n_requests**a * math.exp(b))

    def to_dict(self) -> dict:
        return asdict(self)


def execute_ft(model: nn.Module, tok, requests: list[dict], hp: FTHparams, progress: bool = False):
    """Fine-tune the hparams' weights in place; returns ``(names, per-epoch mean losses)``."""
    layout = model.layout
    names = [layout.weight_name(c, l) for l in hp.layers for c in hp.components]
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    originals = [w.detach().clone() for w in weights]
    was_training = model.training
    flags = {n: p.requires_grad for n, p in params.items()}
    device = weights[0].device
    try:
        model.eval()  # no dropout: the tiny/GPT models define it
        for n, p in params.items():
            p.requires_grad_(n in names)
        opt = torch.optim.Adam(weights, lr=hp.lr, weight_decay=hp.decay(len(requests)))
        texts = [filled(r) for r in requests]
        targets = [r["target_new"] for r in requests]
        curve = []
        for _ in range(hp.num_steps):
            total, count = 0.0, 0
            for s in range(0, len(texts), hp.batch_size):
                batch, labels = target_batch(tok, texts[s : s + hp.batch_size], targets[s : s + hp.batch_size], device)
                opt.zero_grad(set_to_none=True)
                loss = target_nll(model(**batch, use_cache=False).logits, labels).mean()
                total, count = total + loss.item() * len(labels), count + len(labels)
                if loss.item() >= hp.loss_stop:
                    loss.backward()
                    opt.step()
                if hp.norm_constraint is not None:
                    eps = hp.norm_constraint
                    with torch.no_grad():
                        for w, w0 in zip(weights, originals):
                            w.copy_(torch.maximum(torch.minimum(w, w0 + eps), w0 - eps))
            curve.append(total / count)
            if curve[-1] < hp.loss_stop:
                break
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    return names, curve


def apply_ft(model: nn.Module, tok, requests, hparams: FTHparams, cache_dir=None, progress: bool = False) -> EditResult:
    """FT-W edit of ``model`` in place; ``result.restore()`` undoes it bit-identically. ``cache_dir`` is
    unused (FT-W caches nothing); ``progress`` is accepted for the common editor interface."""
    t0 = time.perf_counter()
    reqs = normalize_requests(requests, tok)
    hp = hparams
    layout = model.layout
    names = [layout.weight_name(c, l) for l in hp.layers for c in hp.components]
    originals = snapshot(model, names)
    try:
        _, curve = execute_ft(model, tok, reqs, hp)
    except BaseException:
        restore_weights(model, originals)
        raise
    deltas = {n: weight_delta(model, n, originals[n], layout.conv1d) for n in names}
    info = {"loss_curve": curve, "weight_decay": hp.decay(len(reqs)), "epochs": len(curve)}
    return make_result(
        "ft",
        model,
        originals,
        deltas,
        hparams=hp,
        layers=hp.layers,
        requests=reqs,
        value_info=[dict(info) for _ in reqs],
        timings={"total": time.perf_counter() - t0},
    )
