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

This module also holds the few helpers the three baselines share (result type, hyperparameter files,
prompt+target batches).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .editor import EditResult, MethodUnavailable, normalize_requests
from .tokens import target_text
from .hparams import find_hparams_file

# --------------------------------------------------------------------------------------- result type
def make_result(method: str, model: nn.Module, originals: dict[str, torch.Tensor], deltas, *, hparams,
                layers, requests, **fields_) -> EditResult:
    """The shared :class:`pmet.editing.editor.EditResult` for a baseline. Fields given in ``fields_``
    (``values``, ``keys``, ``stats``, ``value_info``, ``timings`` ...) are set; the other required fields
    the baseline has no use for are left empty (``{}``, ``[]`` or ``()`` by their annotation), so the
    result type may grow without breaking the baselines."""
    kw = dict(method=method, hparams=hparams, layers=tuple(layers), requests=list(requests), deltas=deltas,
              _model=model, _originals=originals, **fields_)
    for f in fields(EditResult):
        if f.name in kw or f.default is not MISSING or f.default_factory is not MISSING:
            continue
        ann = str(f.type)
        kw[f.name] = [] if ann.startswith("list") else () if ann.startswith("tuple") else {}
    return EditResult(**kw)


def snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Exact copies of the named parameters (for ``restore``)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def weight_delta(model: nn.Module, name: str, original: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """``W - W0`` as ``[d_out, d_in]`` float32 on the CPU."""
    w = dict(model.named_parameters())[name].detach()
    d = (w.float() - original.float()).cpu()
    return d.T.contiguous() if conv1d else d


# --------------------------------------------------------------------------------- hyperparameters
def hparams_file(method: str, model: Any, dataset: str = "counterfact") -> Path:
    """``{method}_{model}_{dataset}.json``, ``{method}_{model}.json``, ``{method}_tiny[_{dataset}].json``
    (tiny-*), ``{method}_default.json`` -- the first that exists (:func:`.hparams.find_hparams_file`);
    none raises :class:`MethodUnavailable` (a FileNotFoundError: tables show the row as unavailable)."""
    path, name = find_hparams_file(method, model, dataset, base=method)
    if path is None:
        raise MethodUnavailable(f"no {method} hyperparameter file for {name}/{dataset} (pmet/editing/hparams/)")
    return path


def hparams_from(cls, d: dict, overrides: dict | None = None):
    """``cls(**d)`` ignoring ``_comment`` keys and ``version``; unknown keys raise ValueError."""
    clean = {k: v for k, v in {**d, **(overrides or {})}.items() if not k.startswith("_") and k != "version"}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(clean) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**clean)


def resolve_hparams(cls, method: str, model, hparams, dataset: str = "counterfact"):
    """``hparams`` may be None (file lookup), a dict (overrides of the file) or a ``cls`` instance."""
    if isinstance(hparams, cls):
        return hparams
    d = json.loads(hparams_file(method, model, dataset).read_text())
    return hparams_from(cls, d, hparams if isinstance(hparams, dict) else None)


# ------------------------------------------------------------------------------ prompt + target
def target_batch(tok, prompts: Sequence[str], targets: Sequence[str], device=None):
    """Right-padded ``input_ids``/``attention_mask`` of ``prompt + target`` and ``labels`` (-100 except on
    the target tokens), built from separate tokenisations so the target ids are exactly ``tok(target)``."""
    rows, labels = [], []
    for p, t in zip(prompts, targets):
        p_ids = tok(p, add_special_tokens=True)["input_ids"]
        t_ids = tok(target_text(t), add_special_tokens=False)["input_ids"]
        rows.append(p_ids + t_ids)
        labels.append([-100] * len(p_ids) + t_ids)
    n = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    if device is not None:
        ids, att, lab = ids.to(device), att.to(device), lab.to(device)
    return {"input_ids": ids, "attention_mask": att}, lab


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL of the labelled tokens (logits at ``t`` predict token ``t+1``): ``[batch]``."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    mask = lb != -100
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.clamp(min=0).reshape(-1), reduction="none")
    nll = nll.view(lb.shape) * mask
    return nll.sum(1) / mask.sum(1).clamp(min=1)


def filled(request: dict) -> str:
    return request["prompt"].format(request["subject"])


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
        return float(n_requests ** a * math.exp(b))

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
                batch, labels = target_batch(tok, texts[s:s + hp.batch_size], targets[s:s + hp.batch_size], device)
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


def apply_ft(model: nn.Module, tok, requests, hparams=None, dataset: str = "counterfact", **_) -> EditResult:
    """FT-W edit of ``model`` in place; ``result.restore()`` undoes it bit-identically."""
    t0 = time.perf_counter()
    reqs = normalize_requests(requests, tok)
    hp = resolve_hparams(FTHparams, "ft", model, hparams, dataset)
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
    return make_result("ft", model, originals, deltas, hparams=hp, layers=hp.layers, requests=reqs,
                       value_info=[dict(info) for _ in reqs], timings={"total": time.perf_counter() - t0})


def restore_weights(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, w0 in originals.items():
            model.get_parameter(n).copy_(w0)
