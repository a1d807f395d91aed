"""ROME (Meng et al. 2022a): a rank-one update of ``W_O^FFN`` at one layer per edit, applied sequentially.

For each request, on the model as edited so far (the MEMIT paper's mass-editing comparison applies ROME's
edits one after another):

1. ``k*``: the key (input of ``W_O^FFN``) at the subject's last token, averaged over the context-prefixed
   prompts (ROME Eq. 3; the shared :func:`pmet.editing.core.compute_keys`, MEMIT's group averaging);
2. ``v* = m^l + δ``: ``δ`` is added to the FFN output ``m^l`` at the subject's last token and optimised
   for the target (ROME's ``compute_v``: the shared :func:`pmet.editing.values.optimize_batch` with
   ``value_site="components"`` and no attention delta, i.e. a δ on ``m^l`` only);
3. ROME Eq. 2 with ``C = E[k k^T]`` (:mod:`pmet.stats`, computed once on the *unedited* model as ROME's
   cached statistics)::

       Δ = (v* − W k_r − b) (C^{-1} k*)^T / ((C^{-1} k*)^T k_r)

   ``k_r = k*`` (``residual_key="mean"``, the paper's Eq. 2: ``(W+Δ) k* + b = v*``) or the key of the
   unprefixed prompt (``"prompt"``, the released code's ``cur_input``). ``b`` is ``W_O^FFN``'s bias
   (GPT-J), zero for Llama. ``Δ`` is invariant to the scale of ``C``, so ROME needs no λ.

``v_autocast="bfloat16"`` optimises ``δ`` under autocast with eager attention, as the shared value optimiser
does for PMET/MEMIT (:mod:`pmet.editing.values`); keys, ``C`` and the update stay float32/float64.

Checkpoints (not in ROME's code: long sequential runs on a CPU outlive a session). With ``checkpoint=path``
the state after every ``checkpoint_every`` edits is written there (safetensors, atomic): the edited weight
``W_k`` exactly, the float64 sum of the updates, the keys and values so far, and a hash of the first ``k``
requests. A later call whose first ``k`` requests, hyperparameters and unedited weights are the same
continues from edit ``k + 1``, so the result is bit for bit that of an uninterrupted run. A checkpoint is
never replaced by a shorter one (a 100-edit run does not overwrite the state of 600 edits).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hooks import Trace
from ..stats import key_second_moments
from ..tensor_cache import load_entry, save_entry
from .context import flatten, get_context_templates
from .core import compute_keys
from .editor import EditResult, normalize_requests
from .ft import make_result, resolve_hparams, restore_weights, snapshot
from .hparams import EditHparams
from .values import attention_implementation, encode_with_subject, optimize_batch, pad_id_of, pad_right


@dataclass(frozen=True)
class RomeHparams:
    layer: int | None = 5  # None: the first of model.layout.critical_layers
    # value optimisation (ROME compute_v; GPT-J values of kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json)
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    loss_stop: float = 5e-2
    kl_prompt: str = "{} is a"
    # keys and context templates
    context_length: int = 10
    context_n_per_start: int = 1
    context_seed: int = 0
    key_averaging: str = "groups"
    residual_key: str = "mean"  # "mean" (paper Eq. 2) or "prompt" (released code)
    v_autocast: str | None = None  # "bfloat16": δ optimised under torch.autocast (None: float32)
    # C = E[kk^T]
    mom2_n_tokens: int = 100_000
    mom2_dtype: str = "float32"
    mom2_corpus: str = "wikitext"

    def __post_init__(self):
        if self.residual_key not in ("mean", "prompt"):
            raise ValueError(f"residual_key must be 'mean' or 'prompt', not {self.residual_key!r}")
        if self.v_autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"v_autocast must be None, 'bfloat16' or 'float16', not {self.v_autocast!r}")

    def value_hparams(self) -> EditHparams:
        """The shared value optimiser configured as ROME's compute_v (δ on m^l only, loss < loss_stop)."""
        return EditHparams(method="rome", value_site="components", optimize_attn_delta=False,
                           update_attn_weights=False, stop_rule="memit", v_lr=self.v_lr,
                           v_num_grad_steps=self.v_num_grad_steps, clamp_norm_factor=self.clamp_norm_factor,
                           v_weight_decay=self.v_weight_decay, kl_factor=self.kl_factor,
                           loss_stop=self.loss_stop, kl_prompt=self.kl_prompt, key_averaging=self.key_averaging,
                           v_autocast=self.v_autocast)

    def to_dict(self) -> dict:
        """All fields except ``v_autocast`` while it is None (added later; run ids made before it stay valid)."""
        d = asdict(self)
        if d["v_autocast"] is None:
            d.pop("v_autocast")
        return d


@torch.no_grad()
def prompt_keys(model: nn.Module, tok, request: dict, templates: list[str], layer: int) -> torch.Tensor:
    """Keys of ``W_O^FFN`` at the subject's last token of every ``template.format(prompt)``: ``[P, d_in]``."""
    device = next(model.parameters()).device
    seqs, look = [], []
    for t in templates:
        ids, i = encode_with_subject(tok, t.format(request["prompt"]), request["subject"])
        seqs.append(ids)
        look.append(i)
    ids, mask = pad_right(seqs, pad_id_of(tok), device)
    with Trace(model, record=[("mlp_key", layer)], stop_after=("mlp_key", layer)) as tr:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    k = tr["mlp_key", layer]
    return k[torch.arange(len(seqs), device=device), torch.tensor(look, device=device)].float()


def rank_one_update(W: torch.Tensor, bias: torch.Tensor | None, C: torch.Tensor, k_star: torch.Tensor,
                    k_res: torch.Tensor, v_star: torch.Tensor) -> torch.Tensor:
    """ROME Eq. 2 in float64: ``(v* − W k_r − b) u^T / (u^T k_r)`` with ``u = C^{-1} k*``."""
    W, C, k_star, k_res, v_star = (x.double().cpu() for x in (W, C, k_star, k_res, v_star))
    u = torch.linalg.solve(C, k_star)
    cur = W @ k_res + (bias.double().cpu() if bias is not None else 0.0)
    return torch.outer(v_star - cur, u) / (u @ k_res)


def _requests_hash(requests: list[dict]) -> str:
    fields_ = [{k: r[k] for k in ("prompt", "subject", "target_new")} for r in normalize_requests(requests)]
    return hashlib.sha256(json.dumps(fields_, sort_keys=True).encode()).hexdigest()[:32]


def _checkpoint_key(hp: RomeHparams, name: str, w0: torch.Tensor) -> str:
    """What a checkpoint is valid for besides its requests: hyperparameters and the unedited weight."""
    payload = {"hp": hp.to_dict(), "weight": name, "w0": hashlib.sha256(w0.float().cpu().numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load_checkpoint(path: Path | None, key: str, requests: list[dict], max_step: int | None = None):
    """``(k, tensors, info)`` of a valid checkpoint at ``path`` whose ``k`` requests are a prefix of
    ``requests`` (and ``k <= max_step``), else None."""
    if path is None:
        return None
    hit = load_entry(Path(path), key, ("weight", "total")) if Path(path).exists() else None
    if hit is None:
        return None
    tensors, info = hit
    k = int(info.get("k", 0))
    limit = len(requests) if max_step is None else min(max_step, len(requests))
    if not 1 <= k <= limit or info.get("requests") != _requests_hash(requests[:k]):
        return None
    return k, tensors, info


def _save_checkpoint(path: Path, key: str, k: int, requests, weight, total, values, keys, infos, elapsed) -> None:
    old = load_entry(path, key, ("weight", "total")) if path.exists() else None
    if old is not None and int(old[1].get("k", 0)) > k:
        return  # never replace a longer trajectory by a shorter one
    save_entry(path, {"weight": weight, "total": total, "values": torch.stack(values), "keys": torch.stack(keys)}, key,
               {"k": k, "requests": _requests_hash(requests[:k]), "value_info": infos, "seconds": elapsed})


def apply_rome(model: nn.Module, tok, requests: list[dict], hparams=None, dataset: str = "counterfact",
               cache_dir=None, progress: bool = False, on_step=None, checkpoint: str | Path | None = None,
               checkpoint_every: int = 25, resume_max_step: int | None = None, **_) -> EditResult:
    """ROME edits of ``model`` in place, one request after another; ``restore()`` undoes all of them.

    ``on_step(k, partial)``, if given, is called after the k-th edit (``partial.deltas`` = Δ so far), so a
    caller can evaluate the model after 1, 2, ... edits within one run (Fig. 3's sweep); after resuming from
    a checkpoint at ``k`` it is called for that ``k`` first. ``checkpoint``: a file to resume from and write
    to every ``checkpoint_every`` edits and at the end (module docstring); ``resume_max_step``: ignore
    checkpoints past this edit (a sweep that still needs an earlier point)."""
    t0 = time.perf_counter()
    reqs = normalize_requests(requests, tok)
    hp = resolve_hparams(RomeHparams, "rome", model, hparams, dataset)
    layout = model.layout
    layer = hp.layer if hp.layer is not None else layout.critical_layers[0]
    name = layout.weight_name("mlp_out", layer)
    originals = snapshot(model, [name])
    # statistics and templates come from the unedited model (fingerprints change once weights change)
    C = key_second_moments(model, tok, [layer], "mlp_key", n_tokens=hp.mom2_n_tokens, dtype=hp.mom2_dtype,
                           corpus=hp.mom2_corpus, cache_dir=cache_dir, progress=progress)[layer]
    groups = get_context_templates(model, tok, length=hp.context_length, n_per_start=hp.context_n_per_start,
                                   seed=hp.context_seed, cache_dir=cache_dir)
    templates, sizes = flatten(groups)
    vhp = hp.value_hparams()
    module = layout.module(model, "mlp_out", layer)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    values, keys, infos = [], [], []
    total = torch.zeros(layout.get_weight(model, "mlp_out", layer).shape, dtype=torch.float64)  # Σ rank-one updates
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    ckpt_key = _checkpoint_key(hp, name, originals[name]) if ckpt_path is not None else ""
    start, before, in_hook = 0, 0.0, [0.0]  # edit seconds of earlier sessions; seconds spent in on_step
    resumed = load_checkpoint(ckpt_path, ckpt_key, reqs, resume_max_step)
    param = model.get_parameter(name)
    attn = attention_implementation(model, "eager") if hp.v_autocast else contextlib.nullcontext()

    def elapsed():  # editing seconds, without the caller's evaluations in on_step
        return before + time.perf_counter() - t0 - in_hook[0]

    def step_done(k):
        if on_step is not None:
            t1 = time.perf_counter()
            on_step(k, SimpleNamespace(deltas={name: total.float()}, timings={"total": elapsed()}))
            in_hook[0] += time.perf_counter() - t1

    def save(k):
        _save_checkpoint(ckpt_path, ckpt_key, k, reqs, param.detach(), total, values, keys, infos, elapsed())

    try:
        if resumed is not None:
            start, tensors, info = resumed
            with torch.no_grad():
                param.copy_(tensors["weight"].to(param.device, param.dtype))
            total = tensors["total"].to(torch.float64)
            values, keys = list(tensors["values"].unbind(0)), list(tensors["keys"].unbind(0))
            infos, before = list(info.get("value_info", [])), float(info.get("seconds", 0.0))
            step_done(start)
        bar = tqdm(total=len(reqs), initial=start, desc="ROME edits", disable=not progress or len(reqs) < 2)
        with attn, bar:
            for k, req in enumerate(reqs[start:], start + 1):
                pk = prompt_keys(model, tok, req, templates, layer)
                k_star = compute_keys(pk[None], sizes, hp.key_averaging)[0]
                k_res = k_star if hp.residual_key == "mean" else pk[0]
                vals, info = optimize_batch(model, tok, [req], vhp, templates, layer)
                v_star = vals["mlp"][0].detach()
                W = layout.get_weight(model, "mlp_out", layer).detach()
                delta = rank_one_update(W, bias, C, k_star, k_res, v_star)
                layout.add_to_weight(model, "mlp_out", layer, delta.to(W.device))
                total += delta
                values.append(v_star.float().cpu())
                keys.append(k_res.float().cpu())
                infos.append(info[0])
                bar.update(1)
                step_done(k)
                if ckpt_path is not None and (k % checkpoint_every == 0 or k == len(reqs)):
                    save(k)
    except BaseException:
        restore_weights(model, originals)
        raise
    # Δ = the sum of the computed rank-one updates (float64 -> float32), as the shared editor reports its Δ;
    # W - W0 differs from it only by the rounding of the in-place float32 additions
    deltas = {name: total.float()}
    return make_result("rome", model, originals, deltas, hparams=hp, layers=(layer,), requests=reqs,
                       values={"mlp": torch.stack(values)}, keys={name: torch.stack(keys)}, stats={name: C},
                       value_info=infos, context_templates=groups,
                       timings={"total": elapsed(), "resumed_at": start})
