"""Helpers the baselines (FT-W, ROME, MEND) share: their result, weight snapshots, prompt+target batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, fields

import torch
import torch.nn.functional as F
from torch import nn

from .result import EditResult
from .tokens import target_text


# --------------------------------------------------------------------------------------- result type
def make_result(
    method: str, model: nn.Module, originals: dict[str, torch.Tensor], deltas, *, hparams, layers, requests, **fields_
) -> EditResult:
    """The shared :class:`pmet.editing.result.EditResult` for a baseline. Fields given in ``fields_``
    (``values``, ``keys``, ``stats``, ``value_info``, ``timings`` ...) are set; the other required fields
    the baseline has no use for are left empty (``{}``, ``[]`` or ``()`` by their annotation), so the
    result type may grow without breaking the baselines."""
    kw = dict(
        method=method,
        hparams=hparams,
        layers=tuple(layers),
        requests=list(requests),
        deltas=deltas,
        _model=model,
        _originals=originals,
        **fields_,
    )
    for f in fields(EditResult):
        if f.name in kw or f.default is not MISSING or f.default_factory is not MISSING:
            continue
        ann = str(f.type)
        kw[f.name] = [] if ann.startswith("list") else () if ann.startswith("tuple") else {}
    return EditResult(**kw)


# --------------------------------------------------------------------------------------- weights
def snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Exact copies of the named parameters (for ``restore``)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def restore_weights(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Copy the ``originals`` of :func:`snapshot` back into the model."""
    with torch.no_grad():
        for n, w0 in originals.items():
            model.get_parameter(n).copy_(w0)


def weight_delta(model: nn.Module, name: str, original: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """``W - W0`` as ``[d_out, d_in]`` float32 on the CPU."""
    w = dict(model.named_parameters())[name].detach()
    d = (w.float() - original.float()).cpu()
    return d.T.contiguous() if conv1d else d


# ------------------------------------------------------------------------------ prompt + target
def filled(request: dict) -> str:
    """The request's prompt with its subject filled in."""
    return request["prompt"].format(request["subject"])


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
