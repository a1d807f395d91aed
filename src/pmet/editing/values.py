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
request follows exactly its own trajectory), all prompts of all requests in one right-padded batch. The
model runs once up to layer L without gradients; every step then runs only blocks L..end on the cached
``h^{L-1}`` (:func:`forward_from_layer`) and the unembedding only at the target positions.

Under ``v_autocast`` (bf16) :func:`compute_values` runs the blocks' attention as ``"eager"`` (matrix
products + softmax) instead of PyTorch's fused SDPA while it optimises: on a CPU the fused kernel's bf16
backward is several times slower than its float32 one and ate most of autocast's gain
(``benchmarks/results/profile_values_bf16.txt``); eager attention turns it into bf16 matrix products.
Float32 runs keep the model's own implementation (their cached values stay bit-identical).

Values are cached per request (safetensors, atomic write) under ``cache_dir/values/<fingerprint>/``,
keyed by a hash of everything that changes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hooks import Trace
from ..models import model_fingerprint
from ..paths import cache_dir as default_cache_dir
from ..tensor_cache import load_entry, save_entry
from .hparams import LATER_FIELDS, EditHparams

CACHE_VERSION = 1
VALUE_FIELDS = ("value_site", "optimize_attn_delta", "stop_rule", "v_lr", "v_num_grad_steps",
                "clamp_norm_factor", "v_weight_decay", "kl_factor", "nll_loss_factor", "phi_after_fit",
                "kl_stop", "loss_stop", "kl_prompt")
LATER_VALUE_FIELDS = ("v_autocast",)  # enter the key only when set (keys of older caches stay valid)


# ----------------------------------------------------------------------------------------------------------
# tokenisation
def fill_subject(template: str, subject: str) -> tuple[str, int]:
    """``template`` with its (first) ``{}`` replaced by ``subject``, and the character index where the
    subject ends."""
    i = template.find("{}")
    if i < 0:
        raise ValueError(f"template {template!r} has no '{{}}' for the subject")
    return template[:i] + subject + template[i + 2:], i + len(subject)


def encode_with_subject(tok, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of the filled template and the index of the subject's last token (MEMIT's
    ``fact_token="subject_last"``), found from the tokenizer's character offsets."""
    text, end = fill_subject(template, subject)
    try:
        enc = tok(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        idx = max(i for i, (s, e) in enumerate(offsets) if s < end and e > s)
        return list(enc["input_ids"]), idx
    except (NotImplementedError, TypeError, KeyError):  # slow tokenizer: MEMIT's prefix-length rule
        ids = tok(text)["input_ids"]
        return list(ids), len(tok(text[:end])["input_ids"]) - 1


def target_ids(tok, target: str) -> list[int]:
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: real tokens keep positions 0..n-1 and never attend to padding (causal), so a row
    gives the same result alone or in any batch."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tok) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pid is None else int(pid)


# ----------------------------------------------------------------------------------------------------------
# running only the top of the model
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


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    n, t = attention_mask.shape
    return torch.arange(t, device=attention_mask.device).unsqueeze(0).expand(n, t)


def forward_from_layer(model: nn.Module, h_prev: torch.Tensor, start: int, attention_mask: torch.Tensor
                       ) -> torch.Tensor:
    """Blocks ``start..end`` and the final norm on ``h_prev`` (the input of block ``start``):
    returns the last hidden state ``[batch, seq, d]`` (before the unembedding)."""
    with layers_from(model, start) as base:
        out = base(inputs_embeds=h_prev, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def block_input(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                record=()) -> tuple[torch.Tensor, dict]:
    """Run the model up to block ``layer``'s output, returning its input ``h^{layer-1}`` and the tensors at
    the ``record`` sites (all at ``layer`` or before)."""
    block = model.layout.block(model, layer)
    captured = {}

    def pre_hook(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with Trace(model, record=list(record), stop_after=("block", layer)) as tr:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                  use_cache=False)
    finally:
        handle.remove()
    return captured["h"], dict(tr.outputs)


# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row_req: torch.Tensor  # [N] request of each row
    lookup: torch.Tensor  # [N] subject's last token
    init_rows: torch.Tensor  # [B] row of each request's unprefixed prompt
    kl_rows: torch.Tensor  # [B]
    t_rows: torch.Tensor  # [M] target positions: row, position, token, rewriting-prompt index, request
    t_pos: torch.Tensor
    t_tok: torch.Tensor
    t_prompt: torch.Tensor
    t_req: torch.Tensor
    t_len: torch.Tensor  # [B * P] target length of each rewriting prompt
    n_prompts: int  # P


def build_batch(tok, requests: list[dict], templates: list[str], kl_prompt: str, device) -> _Batch:
    """Rows of request b: its P rewriting prompts (``templates`` in order, the first being ``"{}"``) then
    its KL prompt."""
    seqs, row_req, lookup, init_rows, kl_rows = [], [], [], [], []
    t_rows, t_pos, t_tok, t_prompt, t_req, t_len = [], [], [], [], [], []
    P = len(templates)
    for b, req in enumerate(requests):
        tgt = target_ids(tok, req["target_new"])
        for j, tmpl in enumerate(templates):
            ids, look = encode_with_subject(tok, tmpl.format(req["prompt"]), req["subject"])
            row = len(seqs)
            if j == 0:
                init_rows.append(row)
            n = len(ids)
            seqs.append(ids + tgt[:-1])
            row_req.append(b)
            lookup.append(look)
            for k, t in enumerate(tgt):
                t_rows.append(row), t_pos.append(n - 1 + k), t_tok.append(t)
                t_prompt.append(b * P + j), t_req.append(b)
            t_len.append(len(tgt))
        ids, look = encode_with_subject(tok, kl_prompt, req["subject"])
        kl_rows.append(len(seqs))
        seqs.append(ids)
        row_req.append(b)
        lookup.append(look)
    input_ids, mask = pad_right(seqs, pad_id_of(tok), device)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(input_ids, mask, t(row_req), t(lookup), t(init_rows), t(kl_rows), t(t_rows), t(t_pos),
                  t(t_tok), t(t_prompt), t(t_req), t(t_len).float(), P)


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


def _sites(hp: EditHparams, L: int) -> dict[str, tuple[str, int]]:
    if hp.value_site == "block":
        return {"block": ("block", L)}
    return {"mlp": ("mlp", L), "attn": ("attn", L)}


def _at(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``t[rows, cols]`` as float32, indexed on ``t``'s own device (a layer's GPU under device_map="auto")."""
    return t[rows.to(t.device), cols.to(t.device)].float()


def optimize_batch(model: nn.Module, tok, requests: list[dict], hp: EditHparams, templates: list[str],
                   layer: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimise the δ's of ``requests`` together; returns ``{site name: [B, d] values}`` (``"mlp"`` and
    ``"attn"`` for PMET, ``"block"`` for MEMIT) and per-request diagnostics."""
    device = next(model.parameters()).device
    L = layer
    bt = build_batch(tok, requests, templates, hp.kl_prompt, device)
    B = len(requests)
    sites = _sites(hp, L)
    h_prev, rec = block_input(model, bt.input_ids, bt.attention_mask, L, record=sites.values())
    init = {name: _at(rec[site], bt.init_rows, bt.lookup[bt.init_rows]).to(device) for name, site in sites.items()}
    opt_names = ["block"] if hp.value_site == "block" else (["mlp", "attn"] if hp.optimize_attn_delta else ["mlp"])
    deltas = {n: torch.zeros_like(init[n], requires_grad=True) for n in opt_names}
    opt = torch.optim.Adam(list(deltas.values()), lr=hp.v_lr)
    unembed = model.get_output_embeddings()  # (Layout.unembed is stale for NeoX in transformers 5)
    all_rows = torch.arange(len(bt.row_req), device=device)

    def adder(name):  # (.to(x.device): a no-op unless device_map="auto" put layer L on another GPU)
        vec = deltas[name][bt.row_req]
        return lambda x: x.index_put((all_rows.to(x.device), bt.lookup.to(x.device)),
                                     vec.to(device=x.device, dtype=x.dtype), accumulate=True)

    phi = torch.full((B,), float(hp.nll_loss_factor), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    kl_init = None
    info = [dict(steps=0) for _ in range(B)]
    amp = (torch.autocast(device.type, dtype=getattr(torch, hp.v_autocast)) if hp.v_autocast
           else contextlib.nullcontext())
    for it in range(hp.v_num_grad_steps):
        with amp, Trace(model, add={sites[n]: adder(n) for n in opt_names}):
            hidden = forward_from_layer(model, h_prev, L, bt.attention_mask)
        hidden = hidden.float().to(device)  # the loss (unembedding at the targets, softmax, KL) in float32
        logp = torch.log_softmax(unembed(hidden[bt.t_rows, bt.t_pos]).float(), -1).to(device)
        tok_lp = logp.gather(1, bt.t_tok[:, None])[:, 0]
        missed = (tok_lp < logp.max(-1).values).float()
        nll_prompt = -torch.zeros(B * bt.n_prompts, device=device).index_add(0, bt.t_prompt, tok_lp) / bt.t_len
        nll = nll_prompt.view(B, bt.n_prompts).mean(1)
        prob = torch.exp(-nll_prompt.detach()).view(B, bt.n_prompts).mean(1)
        fit = torch.zeros(B, device=device).index_add(0, bt.t_req, missed) == 0
        kl_lp = torch.log_softmax(unembed(hidden[bt.kl_rows, bt.lookup[bt.kl_rows]]).float(), -1).to(device)
        if kl_init is None:
            kl_init = kl_lp.detach()
        kl = hp.kl_factor * (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
        wd = sum(deltas[n].norm(dim=1) / init[n].norm(dim=1) ** 2 for n in opt_names) * hp.v_weight_decay
        loss = phi * nll + kl + wd

        active = ~done
        for b in active.nonzero()[:, 0].tolist():
            info[b].update(steps=it, loss=float(loss[b].detach()), nll=float(nll[b].detach()), prob=float(prob[b]),
                           kl=float(kl[b].detach()), target_is_top=bool(fit[b]))
        newly = active & (loss.detach() < hp.loss_stop)
        if hp.stop_rule == "pmet":
            phi = torch.where(fit & active, hp.phi_after_fit * hp.nll_loss_factor, phi)
            phi = torch.where(~fit & active, torch.full_like(phi, hp.nll_loss_factor), phi)
            newly |= active & fit & (kl.detach() <= hp.kl_stop)
        done = done | newly
        if it == hp.v_num_grad_steps - 1 or bool(done.all()):
            break
        opt.zero_grad()
        loss[~done].sum().backward()
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


# ----------------------------------------------------------------------------------------------------------
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
        later["attn"] = "eager"  # low-precision values are computed with eager attention (module docstring)
    payload = {"v": CACHE_VERSION, **model_id, "layer": layer, "templates": templates,
               "hp": {**{f: getattr(hp, f) for f in VALUE_FIELDS}, **later},
               "request": {k: request[k] for k in ("prompt", "subject", "target_new")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def compute_values(model: nn.Module, tok, requests: list[dict], hp: EditHparams, templates: list[str],
                   layer: int, cache_dir: str | Path | None = None, use_cache: bool = True,
                   progress: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``V1`` for all ``requests`` (normalised dicts, target with its leading space) at layer ``layer``:
    ``{site name: [n, d]}`` on the model's device, plus per-request diagnostics (``info["cached"]``)."""
    device = next(model.parameters()).device
    names = list(_sites(hp, layer))
    results: list[dict | None] = [None] * len(requests)
    infos: list[dict] = [{} for _ in requests]
    keys, paths = [None] * len(requests), [None] * len(requests)
    if use_cache:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        model_id = {"fingerprint": model_fingerprint(model), "weights": weights_checksum(model)}
        for i, req in enumerate(requests):
            keys[i] = value_cache_key(model_id, hp, layer, templates, req)
            paths[i] = root / "values" / model_id["fingerprint"] / f"{keys[i]}.safetensors"
            hit = load_entry(paths[i], keys[i], names)
            if hit is not None:
                results[i] = {n: hit[0][n].to(device) for n in names}
                infos[i] = {**hit[1], "cached": True}
    todo = [i for i, r in enumerate(results) if r is None]
    batches = [todo[s:s + hp.v_batch_size] for s in range(0, len(todo), hp.v_batch_size)]
    attn = attention_implementation(model, "eager") if hp.v_autocast else contextlib.nullcontext()
    with attn:
        for batch in tqdm(batches, desc=f"values ({hp.method}, layer {layer})", disable=not progress or not batches):
            vals, info = optimize_batch(model, tok, [requests[i] for i in batch], hp, templates, layer)
            for j, i in enumerate(batch):
                results[i] = {n: vals[n][j] for n in names}
                infos[i] = {**info[j], "cached": False}
                if use_cache:
                    save_entry(paths[i], {n: t.float() for n, t in results[i].items()}, keys[i], info[j])
    return {n: torch.stack([r[n] for r in results]) for n in names}, infos
