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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hooks import Trace
from ..stats import key_second_moments
from .context import flatten, get_context_templates
from .core import compute_keys
from .editor import EditResult, normalize_requests
from .ft import make_result, resolve_hparams, restore_weights, snapshot
from .hparams import EditHparams
from .values import encode_with_subject, optimize_batch, pad_id_of, pad_right


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
    # C = E[kk^T]
    mom2_n_tokens: int = 100_000
    mom2_dtype: str = "float32"
    mom2_corpus: str = "wikitext"

    def __post_init__(self):
        if self.residual_key not in ("mean", "prompt"):
            raise ValueError(f"residual_key must be 'mean' or 'prompt', not {self.residual_key!r}")

    def value_hparams(self) -> EditHparams:
        """The shared value optimiser configured as ROME's compute_v (δ on m^l only, loss < loss_stop)."""
        return EditHparams(method="rome", value_site="components", optimize_attn_delta=False,
                           update_attn_weights=False, stop_rule="memit", v_lr=self.v_lr,
                           v_num_grad_steps=self.v_num_grad_steps, clamp_norm_factor=self.clamp_norm_factor,
                           v_weight_decay=self.v_weight_decay, kl_factor=self.kl_factor,
                           loss_stop=self.loss_stop, kl_prompt=self.kl_prompt, key_averaging=self.key_averaging)

    def to_dict(self) -> dict:
        return asdict(self)


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


def apply_rome(model: nn.Module, tok, requests: list[dict], hparams=None, dataset: str = "counterfact",
               cache_dir=None, progress: bool = False, on_step=None, **_) -> EditResult:
    """ROME edits of ``model`` in place, one request after another; ``restore()`` undoes all of them.

    ``on_step(k, partial)``, if given, is called after the k-th edit (``partial.deltas`` = Δ so far), so a
    caller can evaluate the model after 1, 2, ... edits within one run (Fig. 3's sweep)."""
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
    try:
        for k, req in enumerate(tqdm(reqs, desc="ROME edits", disable=not progress or len(reqs) < 2), 1):
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
            if on_step is not None:
                on_step(k, SimpleNamespace(deltas={name: total.float()},
                                           timings={"total": time.perf_counter() - t0}))
    except BaseException:
        restore_weights(model, originals)
        raise
    # Δ = the sum of the computed rank-one updates (float64 -> float32), as the shared editor reports its Δ;
    # W - W0 differs from it only by the rounding of the in-place float32 additions
    deltas = {name: total.float()}
    return make_result("rome", model, originals, deltas, hparams=hp, layers=(layer,), requests=reqs,
                       values={"mlp": torch.stack(values)}, keys={name: torch.stack(keys)}, stats={name: C},
                       value_info=infos, context_templates=groups,
                       timings={"total": time.perf_counter() - t0})
