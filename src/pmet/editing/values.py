"""Target values ``V1`` (Eq. 10): optimise δ's at layer ``L`` so the model predicts the new object.

PMET (``value_site="components"``) adds δ^a to ``a^L`` and δ^m to ``m^L`` at the subject's last token of
every prompt and keeps ``v^m = m^L + δ^m`` (and ``v^a = a^L + δ^a`` for the "w/ W_O^MHSA" ablation);
MEMIT (``value_site="block"``) adds one δ to ``h^L`` and keeps ``v = h^L + δ``. The loss of request i is
(the authors' ``compute_zs`` / MEMIT's ``compute_z``)::

    φ · mean_j NLL(target | pref_j ⊕ prompt)  +  μ · KL(P_edited || P_orig)[KL prompt]  +  wd · Σ ||δ|| / ||init||²

Details that follow the authors' implementation where the paper is silent:

* prompts are ``template.format(prompt)`` with the subject filled in, followed by the target tokens but
  the last (teacher forcing); the NLL of each prompt is averaged over the target tokens;
* δ is added at the subject's last token in *every* row, the KL row included; the KL distribution is
  read at that same position of ``"{subject} is a"`` (so, under causal attention, it is the next-token
  distribution after the subject), its reference is the δ=0 distribution of the first step, and the
  direction is KL(edited || original) as in Eq. 10 (``F.kl_div(init, cur, log_target=True)``);
* the weight decay is ``wd · ||δ|| / ||init||²`` (the norm, not its square, as in the released code),
  summed over δ^a and δ^m; ``init`` is the vector at the unprefixed prompt (template ``"{}"``);
* after each Adam step each δ is projected into the ball of radius ``clamp_norm_factor · ||init||``;
* stopping (checked on the loss *before* a step; the last step is evaluated but not applied):
  ``stop_rule="memit"``: loss < ``loss_stop``. ``stop_rule="pmet"`` (Appendix D + released code): the
  same test, plus: once the target is the most likely token at every target position of every prefixed
  prompt (the code's ``max_prob == prob``), φ becomes ``phi_after_fit · φ`` (0.1) for the next step,
  back to φ if the target is lost again, and the optimisation stops when ``μ·KL <= kl_stop`` (0.01; the
  code compares the μ-weighted term, the paper writes D_KL).

In sequential blocks (Llama, GPT-2, Gemma-3) the FFN at L reads ``h^{L-1} + a^L + δ^a``, so during the
optimisation the FFN output also moves with δ^a; as in the paper (``v^m = m^L + δ^m``) and the released
code (written for the parallel GPT-J / NeoX blocks, where the question does not arise) the kept value is
the *original* ``m^L`` plus δ^m, i.e. δ^a and its indirect effects are discarded.

Difference from the authors: the prompt and the target are tokenised separately and concatenated (the
authors tokenise ``prompt + decode(target[:-1])`` as one string and assume the target's tokens are the
last ones); this is identical for the usual space-prefixed targets and never misaligns the labels.

Fast path: requests are optimised in batches (each with its own δ's; Adam is element-wise, so each
request follows exactly its own trajectory), all prompts of all requests in one right-padded batch
(:func:`pmet.editing.tokens.build_value_batch`). The model runs once up to layer L without gradients;
every step then runs only blocks L..end on the cached ``h^{L-1}``
(:func:`pmet.editing.partial_forward.forward_from_layer`) and the unembedding only at the target
positions. The loss itself is :func:`value_loss`.

Under ``v_autocast`` (bf16) :func:`compute_values` runs the blocks' attention as ``"eager"`` (matrix
products + softmax) instead of PyTorch's fused SDPA while it optimises: on a CPU the fused kernel's bf16
backward is several times slower than its float32 one and ate most of autocast's gain
(``benchmarks/results/profile_values_bf16.txt``); eager attention turns it into bf16 matrix products.
Float32 runs keep the model's own implementation (their cached values stay bit-identical).

Values are cached per request (safetensors, atomic write, checksummed: :mod:`pmet.tensor_cache`) under
``cache_dir/values/<fingerprint>/``, keyed by a hash of everything that changes them
(:mod:`pmet.editing.value_cache`). Each entry also records the keys of the batch it was optimised in, so a
value missing from a partly saved or partly corrupt batch is recomputed in that same batch and comes out bit
for bit as before (:func:`pmet.editing.value_cache.resume_batches`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hooks import Trace
from ..models import model_fingerprint, warn_slow_low_precision
from ..paths import cache_dir as default_cache_dir
from ..tensor_cache import load_entry, save_entry
from .hparams import EditHparams
from .partial_forward import (
    attention_implementation,
    block_input,
    forward_from_layer,
    forward_from_prefix,
    low_precision_blocks,
    prefix_state,
    swapped_blocks,
)
from .tokens import build_value_batch, pad_id_of, split_at_subject
from .value_cache import resume_batches, value_cache_key, weights_checksum


def value_sites(hp: EditHparams, L: int) -> dict[str, tuple[str, int]]:
    """Where the values live: ``{"block": h^L}`` (MEMIT) or ``{"mlp": m^L, "attn": a^L}`` (PMET)."""
    if hp.value_site == "block":
        return {"block": ("block", L)}
    return {"mlp": ("mlp", L), "attn": ("attn", L)}


def _at(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``t[rows, cols]`` as float32, indexed on ``t``'s own device (a layer's GPU under device_map="auto")."""
    return t[rows.to(t.device), cols.to(t.device)].float()


@dataclass
class ValueLoss:
    """Eq. 10 per request (``[B]`` each): ``total = phi·nll + kl + weight_decay``, and diagnostics."""

    total: torch.Tensor
    nll: torch.Tensor  # (1/P) Σ_j of each prompt's mean target-token NLL
    kl: torch.Tensor  # μ · KL(P_edited || P_orig) at the KL prompt
    weight_decay: torch.Tensor  # wd · Σ_δ ||δ|| / ||init||²
    prob: torch.Tensor  # (1/P) Σ_j exp(-NLL_j), no gradient
    fit: torch.Tensor  # bool: the target is the argmax at every target position of every prompt


def value_loss(
    target_logp: torch.Tensor,
    target_tokens: torch.Tensor,
    target_prompt: torch.Tensor,
    target_request: torch.Tensor,
    prompt_len: torch.Tensor,
    kl_logp: torch.Tensor,
    kl_ref: torch.Tensor,
    deltas,
    inits,
    phi,
    mu: float,
    weight_decay: float,
) -> ValueLoss:
    """Eq. 10, the loss of the value vectors, for ``B`` requests with ``P`` prompts each::

        L(δ_i) = μ · D_KL(P_edited[y | p'] || P_orig[y | p'])
                 + φ · (1/P) Σ_j −log P_edited[y_i | pref_j ⊕ p(x_i)]  +  wd · Σ_δ ||δ_i|| / ||init_i||²

    ``target_logp`` ``[M, V]``: the edited model's log-probabilities at the ``M`` target positions of all
    prompts (teacher forcing), with their ``target_tokens``, ``target_prompt`` (index ``b·P + j`` of the
    prompt) and ``target_request`` (``b``) ``[M]``; ``prompt_len`` ``[B·P]``: the number of target tokens
    of each prompt. ``kl_logp`` ``[B, V]``: the edited model's log-distribution at the KL prompt ``p'``
    (``"{subject} is a"``), ``kl_ref`` the unedited one. ``deltas``/``inits``: the optimised δ's and the
    vectors they are added to (``[B, d]`` each). ``phi`` (float or ``[B]``), ``mu``, ``weight_decay``:
    φ, μ and wd.

    Where the paper is silent this is the authors' ``compute_zs`` (MEMIT's ``compute_z``): a multi-token
    target's NLL is the mean over its tokens; the weight decay (not in Eq. 10) is the norm, not its square,
    of each δ relative to the squared norm of its unprefixed-prompt vector, summed over δ^a and δ^m.
    """
    B = kl_logp.shape[0]
    P = prompt_len.numel() // B
    device = target_logp.device
    tok_lp = target_logp.gather(1, target_tokens[:, None])[:, 0]
    missed = (tok_lp < target_logp.max(-1).values).float()
    nll_prompt = -torch.zeros(B * P, device=device).index_add(0, target_prompt, tok_lp) / prompt_len
    nll = nll_prompt.view(B, P).mean(1)
    prob = torch.exp(-nll_prompt.detach()).view(B, P).mean(1)
    fit = torch.zeros(B, device=device).index_add(0, target_request, missed) == 0
    kl = mu * (kl_logp.exp() * (kl_logp - kl_ref)).sum(-1)
    wd = sum(d.norm(dim=1) / i.norm(dim=1) ** 2 for d, i in zip(deltas, inits)) * weight_decay
    return ValueLoss(total=phi * nll + kl + wd, nll=nll, kl=kl, weight_decay=wd, prob=prob, fit=fit)


@dataclass
class _Live:
    """The rows of a :class:`~pmet.editing.tokens.ValueBatch` that belong to the requests ``req`` (still
    optimised), with every index renumbered for the sub-batch and the padding trimmed to its longest row."""

    req: torch.Tensor  # [B'] request ids (into the full batch)
    mask: torch.Tensor  # [N', T']
    rows: torch.Tensor  # [N'] rows of the full batch
    row_req: torch.Tensor  # [N'] request id (full batch) of each row
    lookup: torch.Tensor
    kl_rows: torch.Tensor  # [B'] (sub-batch rows)
    t_rows: torch.Tensor
    t_pos: torch.Tensor
    t_tok: torch.Tensor
    t_prompt: torch.Tensor  # index b'·P + j in the sub-batch
    t_req: torch.Tensor  # b' in the sub-batch
    t_len: torch.Tensor  # [B'·P]


def _live_rows(bt, req: torch.Tensor) -> _Live:
    B = bt.kl_rows.numel()
    P = bt.n_prompts
    device = bt.row_req.device
    rows = torch.isin(bt.row_req, req).nonzero()[:, 0]
    row_pos = torch.full((bt.row_req.numel(),), -1, dtype=torch.long, device=device)
    row_pos[rows] = torch.arange(rows.numel(), device=device)
    req_pos = torch.full((B,), -1, dtype=torch.long, device=device)
    req_pos[req] = torch.arange(req.numel(), device=device)
    keep = torch.isin(bt.t_req, req)
    mask = bt.attention_mask[rows]
    width = int(mask.sum(1).max())
    t_req = req_pos[bt.t_req[keep]]
    return _Live(
        req=req,
        mask=mask[:, :width],
        rows=rows,
        row_req=bt.row_req[rows],
        lookup=bt.lookup[rows],
        kl_rows=row_pos[bt.kl_rows[req]],
        t_rows=row_pos[bt.t_rows[keep]],
        t_pos=bt.t_pos[keep],
        t_tok=bt.t_tok[keep],
        t_prompt=t_req * P + bt.t_prompt[keep] % P,
        t_req=t_req,
        t_len=bt.t_len.view(B, P)[req].reshape(-1),
    )


def optimize_batch(
    model: nn.Module,
    tok,
    requests: list[dict],
    hp: EditHparams,
    templates: list[str],
    layer: int,
    blocks: list[nn.Module] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimise the δ's of ``requests`` together; returns ``{site name: [B, d] values}`` (``"mlp"`` and
    ``"attn"`` for PMET, ``"block"`` for MEMIT) and per-request diagnostics. ``blocks``: stand-ins for
    blocks ``layer..end`` during the optimisation steps (:func:`~pmet.editing.partial_forward.low_precision_blocks`).

    ``hp.v_fast``: a request that has stopped leaves the batch (its rows are no longer computed, the padding
    is trimmed to the longest remaining row) instead of riding along until the slowest request stops. Each
    request follows the same trajectory in exact arithmetic (rows never interact: causal attention, right
    padding, per-request loss and element-wise Adam); only the rounding of matrix products of other shapes
    differs, which is why it is an option recorded in the cache key."""
    device = next(model.parameters()).device
    L = layer
    bt = build_value_batch(tok, requests, templates, hp.kl_prompt, device)
    B = len(requests)
    sites = value_sites(hp, L)
    prefix = None
    if hp.v_fast:  # the positions before the subject's last token are run once (keys/values kept)
        split = split_at_subject(bt, pad_id_of(tok))
        state = prefix_state(
            model,
            split.prefix_ids,
            split.prefix_mask,
            split.suffix.input_ids,
            split.suffix.attention_mask,
            L,
            record=sites.values(),
        )
        if state is not None:
            bt = split.suffix
            h_prev, rec, prefix = state
    if prefix is None:
        h_prev, rec = block_input(model, bt.input_ids, bt.attention_mask, L, record=sites.values())
    init = {name: _at(rec[site], bt.init_rows, bt.lookup[bt.init_rows]).to(device) for name, site in sites.items()}
    opt_names = ["block"] if hp.value_site == "block" else (["mlp", "attn"] if hp.optimize_attn_delta else ["mlp"])
    deltas = {n: torch.zeros_like(init[n], requires_grad=True) for n in opt_names}
    opt = torch.optim.Adam(list(deltas.values()), lr=hp.v_lr)
    unembed = model.get_output_embeddings()  # (Layout.unembed is stale for NeoX in transformers 5)
    all_rows = torch.arange(len(bt.row_req), device=device)

    def adder(name):  # (.to(x.device): a no-op unless device_map="auto" put layer L on another GPU)
        vec = deltas[name][bt.row_req]
        return lambda x: x.index_put(
            (all_rows.to(x.device), bt.lookup.to(x.device)), vec.to(device=x.device, dtype=x.dtype), accumulate=True
        )

    def live_adder(name, lv):
        vec, rows = deltas[name][lv.row_req], torch.arange(lv.rows.numel(), device=device)
        return lambda x: x.index_put((rows, lv.lookup), vec.to(x.dtype), accumulate=True)

    phi = torch.full((B,), float(hp.nll_loss_factor), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    kl_init = None
    info = [dict(steps=0) for _ in range(B)]
    amp = (
        torch.autocast(device.type, dtype=getattr(torch, hp.v_autocast)) if hp.v_autocast else contextlib.nullcontext()
    )
    lv = None
    for it in range(hp.v_num_grad_steps):
        if not hp.v_fast:  # the reference: every request's rows, every step
            with amp, swapped_blocks(model, L, blocks), Trace(model, add={sites[n]: adder(n) for n in opt_names}):
                hidden = forward_from_layer(model, h_prev, L, bt.attention_mask)
            hidden = hidden.float().to(device)  # the loss (unembedding at the targets, softmax, KL) in float32
            logp = torch.log_softmax(unembed(hidden[bt.t_rows, bt.t_pos]).float(), -1).to(device)
            kl_lp = torch.log_softmax(unembed(hidden[bt.kl_rows, bt.lookup[bt.kl_rows]]).float(), -1).to(device)
            if kl_init is None:
                kl_init = kl_lp.detach()  # the reference distribution: δ = 0 at the first step
            terms = value_loss(
                logp,
                bt.t_tok,
                bt.t_prompt,
                bt.t_req,
                bt.t_len,
                kl_lp,
                kl_init,
                [deltas[n] for n in opt_names],
                [init[n] for n in opt_names],
                phi,
                hp.kl_factor,
                hp.v_weight_decay,
            )
            req, active, phi_now = torch.arange(B, device=device), ~done, phi
        else:  # only the requests still optimised
            if lv is None or lv.req.numel() != int((~done).sum()):
                lv = _live_rows(bt, (~done).nonzero()[:, 0])
                if prefix is not None:
                    lv_prefix = prefix.rows(lv.rows, getattr(torch, hp.v_autocast) if hp.v_autocast else None)
            with (
                amp,
                swapped_blocks(model, L, blocks),
                Trace(model, add={sites[n]: live_adder(n, lv) for n in opt_names}),
            ):
                h_live = h_prev[lv.rows, : lv.mask.shape[1]]
                hidden = (
                    forward_from_prefix(model, h_live, L, lv.mask, lv_prefix)
                    if prefix is not None
                    else forward_from_layer(model, h_live, L, lv.mask)
                )
            hidden = hidden.float()
            logp = torch.log_softmax(unembed(hidden[lv.t_rows, lv.t_pos]).float(), -1)
            kl_lp = torch.log_softmax(unembed(hidden[lv.kl_rows, lv.lookup[lv.kl_rows]]).float(), -1)
            if kl_init is None:
                kl_init = kl_lp.detach()  # first step: every request is live, in order
            req, phi_now = lv.req, phi[lv.req]
            terms = value_loss(
                logp,
                lv.t_tok,
                lv.t_prompt,
                lv.t_req,
                lv.t_len,
                kl_lp,
                kl_init[req],
                [deltas[n][req] for n in opt_names],
                [init[n][req] for n in opt_names],
                phi_now,
                hp.kl_factor,
                hp.v_weight_decay,
            )
            active = torch.ones(req.numel(), dtype=torch.bool, device=device)
        loss, nll, kl, prob, fit = terms.total, terms.nll, terms.kl, terms.prob, terms.fit

        for k in active.nonzero()[:, 0].tolist():
            b = int(req[k])
            info[b].update(
                steps=it,
                loss=float(loss[k].detach()),
                nll=float(nll[k].detach()),
                prob=float(prob[k]),
                kl=float(kl[k].detach()),
                target_is_top=bool(fit[k]),
            )
        newly = active & (loss.detach() < hp.loss_stop)
        if hp.stop_rule == "pmet":
            phi_now = torch.where(fit & active, hp.phi_after_fit * hp.nll_loss_factor, phi_now)
            phi_now = torch.where(~fit & active, torch.full_like(phi_now, hp.nll_loss_factor), phi_now)
            newly |= active & fit & (kl.detach() <= hp.kl_stop)
            phi = phi.index_put((req,), phi_now)  # out of place: this step's loss holds phi for backward
        finished = done[req] | newly  # of the requests in this step's batch
        done[req] = finished
        if it == hp.v_num_grad_steps - 1 or bool(done.all()):
            break
        opt.zero_grad()
        loss[~finished].sum().backward()
        before = {n: d.detach().clone() for n, d in deltas.items()}
        opt.step()
        with torch.no_grad():
            for n, d in deltas.items():
                d[done] = before[n][done]  # finished requests keep their δ (Adam's momentum would move it)
                max_norm = hp.clamp_norm_factor * init[n].norm(dim=1)
                norm = d.norm(dim=1)
                scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-30), torch.ones_like(norm))
                d.mul_(scale[:, None])
    for b in range(B):
        info[b]["stopped_early"] = bool(done[b])
    values = {n: (init[n] + deltas[n].detach()) if n in deltas else init[n].clone() for n in sites}
    for b in range(B):
        for n in sites:
            info[b][f"delta_norm_{n}"] = float((values[n][b] - init[n][b]).norm())
            info[b][f"init_norm_{n}"] = float(init[n][b].norm())
    return values, info


def compute_values(
    model: nn.Module,
    tok,
    requests: list[dict],
    hp: EditHparams,
    templates: list[str],
    layer: int,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``V1`` for all ``requests`` (normalised dicts, target with its leading space) at layer ``layer``:
    ``{site name: [n, d]}`` on the model's device, plus per-request diagnostics (``info["cached"]``)."""
    device = next(model.parameters()).device
    names = list(value_sites(hp, layer))
    results: list[dict | None] = [None] * len(requests)
    infos: list[dict] = [{} for _ in requests]
    keys, paths = [None] * len(requests), [None] * len(requests)
    mates: list[list[str] | None] = [None] * len(requests)  # cached entries: the keys of the batch they came from
    if use_cache:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        model_id = {"fingerprint": model_fingerprint(model), "weights": weights_checksum(model)}
        for i, req in enumerate(requests):
            keys[i] = value_cache_key(model_id, hp, layer, templates, req)
            paths[i] = root / "values" / model_id["fingerprint"] / f"{keys[i]}.safetensors"
            hit = load_entry(paths[i], keys[i], names)
            if hit is not None:
                info = dict(hit[1])
                mates[i] = info.pop("batch_keys", None)
                results[i] = {n: hit[0][n].to(device) for n in names}
                infos[i] = {**info, "cached": True}
    todo = [i for i, r in enumerate(results) if r is None]
    batches = resume_batches(keys, mates, todo)
    rebuilt = {i for b in batches for i in b}
    rest = [i for i in todo if i not in rebuilt]
    batches += [rest[s : s + hp.v_batch_size] for s in range(0, len(rest), hp.v_batch_size)]
    if hp.v_autocast and todo:
        warn_slow_low_precision(device, hp.v_autocast, "value vectors")
    attn = attention_implementation(model, "eager") if hp.v_autocast else contextlib.nullcontext()
    # under autocast the matrices of blocks L..end are cast once here rather than at every use (same numbers)
    blocks = low_precision_blocks(model, layer, getattr(torch, hp.v_autocast)) if hp.v_autocast and todo else None
    with attn:
        for batch in tqdm(batches, desc=f"values ({hp.method}, layer {layer})", disable=not progress or not batches):
            vals, info = optimize_batch(model, tok, [requests[i] for i in batch], hp, templates, layer, blocks)
            for j, i in enumerate(batch):
                if results[i] is not None:  # a cached batch-mate, recomputed only to rebuild the batch
                    continue
                results[i] = {n: vals[n][j] for n in names}
                infos[i] = {**info[j], "cached": False}
                if use_cache:
                    save_entry(
                        paths[i],
                        {n: t.float() for n, t in results[i].items()},
                        keys[i],
                        {**info[j], "batch_keys": [keys[b] for b in batch]},
                    )
    return {n: torch.stack([r[n] for r in results]) for n in names}, infos
