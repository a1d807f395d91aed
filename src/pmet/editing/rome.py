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

Trajectory file (not in ROME's code: long sequential runs on a CPU outlive a session). With
``checkpoint=path`` every ``checkpoint_every`` edits (and at the end) the run's trajectory is written there
(safetensors, atomic): each edit's rank-one factors ``a = v* − W k_r − b``, ``u = C^{-1} k*`` and ``u^T k_r``
(float64, ~17 KB per edit for SmolLM2), its key and value, and a hash of each request. A later call replays
the edits its requests share with the file (the same ``Δ_j`` recomputed from the same factors and added in
the same order: bit for bit the weights of the original run, in seconds) and edits the rest. So a run of
``n`` edits is free once a longer run with the same first ``n`` requests exists, and an interrupted run
continues where its file ends. A file is only replaced by a longer trajectory.
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
from .baseline import make_result, restore_weights, snapshot
from .context import flatten, get_context_templates
from .core import compute_keys
from .hparams import EditHparams
from .partial_forward import attention_implementation
from .requests import normalize_requests
from .result import EditResult
from .tokens import encode_with_subject, pad_id_of, pad_right
from .values import optimize_batch


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
        return EditHparams(
            method="rome",
            value_site="components",
            optimize_attn_delta=False,
            update_attn_weights=False,
            stop_rule="memit",
            v_lr=self.v_lr,
            v_num_grad_steps=self.v_num_grad_steps,
            clamp_norm_factor=self.clamp_norm_factor,
            v_weight_decay=self.v_weight_decay,
            kl_factor=self.kl_factor,
            loss_stop=self.loss_stop,
            kl_prompt=self.kl_prompt,
            key_averaging=self.key_averaging,
            v_autocast=self.v_autocast,
        )

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
    k = tr["mlp_key", layer]  # on the layer's device (models spread over GPUs with device_map="auto")
    return k[torch.arange(len(seqs), device=k.device), torch.tensor(look, device=k.device)].float()


def rank_one_factors(
    W: torch.Tensor,
    bias: torch.Tensor | None,
    C: torch.Tensor,
    k_star: torch.Tensor,
    k_res: torch.Tensor,
    v_star: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROME Eq. 2's factors in float64: ``a = v* − W k_r − b``, ``u = C^{-1} k*`` and ``u^T k_r``."""
    W, C, k_star, k_res, v_star = (x.double().cpu() for x in (W, C, k_star, k_res, v_star))
    u = torch.linalg.solve(C, k_star)
    cur = W @ k_res + (bias.double().cpu() if bias is not None else 0.0)
    return v_star - cur, u, u @ k_res


def rank_one_delta(a: torch.Tensor, u: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """``Δ = a u^T / (u^T k_r)`` (the same operations whether computed or replayed, so the same bits)."""
    return torch.outer(a, u) / denom


def _request_hashes(requests: list[dict]) -> list[str]:
    return [
        hashlib.sha256(
            json.dumps({k: r[k] for k in ("prompt", "subject", "target_new")}, sort_keys=True).encode()
        ).hexdigest()[:16]
        for r in normalize_requests(requests)
    ]


def _checkpoint_key(hp: RomeHparams, name: str, w0: torch.Tensor) -> str:
    """What a trajectory is valid for besides its requests: hyperparameters and the unedited weight."""
    payload = {"hp": hp.to_dict(), "weight": name, "w0": hashlib.sha256(w0.float().cpu().numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


TRAJECTORY = ("a", "u", "denom", "values", "keys")


def load_checkpoint(path: str | Path | None, key: str, requests: list[dict]):
    """``(m, tensors, info)``: the trajectory at ``path`` cut to the first ``m`` edits, ``m`` = how many of
    ``requests`` it holds in the same order (None when it holds none or is not valid for ``key``)."""
    if path is None or not Path(path).exists():
        return None
    hit = load_entry(Path(path), key, TRAJECTORY)
    if hit is None:
        return None
    tensors, info = hit
    m = 0
    for stored, wanted in zip(info.get("requests", []), _request_hashes(requests)):
        if stored != wanted:
            break
        m += 1
    if m == 0:
        return None
    return m, {n: t[:m] for n, t in tensors.items()}, info


def _save_checkpoint(path: Path, key: str, requests, factors, values, keys, infos, seconds) -> None:
    k = len(values)
    if path.exists():
        old = load_entry(path, key, TRAJECTORY)
        if old is not None and len(old[1].get("requests", [])) >= k:
            return  # only a longer trajectory replaces a file
    tensors = {
        "a": torch.stack([f[0] for f in factors]),
        "u": torch.stack([f[1] for f in factors]),
        "denom": torch.stack([f[2] for f in factors]),
        "values": torch.stack(values),
        "keys": torch.stack(keys),
    }
    save_entry(path, tensors, key, {"requests": _request_hashes(requests[:k]), "value_info": infos, "seconds": seconds})


def apply_rome(
    model: nn.Module,
    tok,
    requests: list[dict],
    hparams: RomeHparams,
    cache_dir=None,
    progress: bool = False,
    on_step=None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 25,
) -> EditResult:
    """ROME edits of ``model`` in place, one request after another; ``restore()`` undoes all of them.

    ``on_step(k, partial)``, if given, is called after the k-th edit (``partial.deltas`` = Δ so far,
    ``partial.value_info`` the edits' value optimisation infos so far, first ``k`` valid), so a
    caller can evaluate the model after 1, 2, ... edits within one run (Fig. 3's sweep); replayed edits
    count too. ``checkpoint``: the trajectory file to replay from and to write every ``checkpoint_every``
    edits and at the end (module docstring). ``timings["replayed"]``: edits taken from the file."""
    t0 = time.perf_counter()
    reqs = normalize_requests(requests, tok)
    hp = hparams
    layout = model.layout
    layer = hp.layer if hp.layer is not None else layout.critical_layers[0]
    name = layout.weight_name("mlp_out", layer)
    originals = snapshot(model, [name])
    # statistics and templates come from the unedited model (fingerprints change once weights change)
    C = key_second_moments(
        model,
        tok,
        [layer],
        "mlp_key",
        n_tokens=hp.mom2_n_tokens,
        dtype=hp.mom2_dtype,
        corpus=hp.mom2_corpus,
        cache_dir=cache_dir,
        progress=progress,
    )[layer]
    groups = get_context_templates(
        model,
        tok,
        length=hp.context_length,
        n_per_start=hp.context_n_per_start,
        seed=hp.context_seed,
        cache_dir=cache_dir,
    )
    templates, sizes = flatten(groups)
    vhp = hp.value_hparams()
    module = layout.module(model, "mlp_out", layer)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    W = layout.get_weight(model, "mlp_out", layer)
    total = torch.zeros(W.shape, dtype=torch.float64)  # Σ rank-one updates
    factors, values, keys, infos, seconds = [], [], [], [], []  # per edit; seconds: cumulative editing time
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    ckpt_key = _checkpoint_key(hp, name, originals[name]) if ckpt_path is not None else ""
    stored = load_checkpoint(ckpt_path, ckpt_key, reqs)
    in_hook = [0.0]  # seconds spent in on_step (the caller's evaluations), not editing time
    if hp.v_autocast:
        from ..models import warn_slow_low_precision

        warn_slow_low_precision(W.device, hp.v_autocast, "ROME's value vectors")
    attn = attention_implementation(model, "eager") if hp.v_autocast else contextlib.nullcontext()

    def apply(f, v, k_r, info, secs):
        nonlocal total
        delta = rank_one_delta(*f)
        layout.add_to_weight(model, "mlp_out", layer, delta.to(W.device))
        total += delta
        factors.append(f)
        values.append(v)
        keys.append(k_r)
        infos.append(info)
        seconds.append(secs)
        if on_step is not None:
            t1 = time.perf_counter()
            partial = SimpleNamespace(deltas={name: total.float()}, timings={"total": secs}, value_info=infos)
            on_step(len(values), partial)
            in_hook[0] += time.perf_counter() - t1

    replayed = 0
    try:
        bar = tqdm(total=len(reqs), desc="ROME edits", disable=not progress or len(reqs) < 2)
        with attn, bar:
            if stored is not None:
                replayed, t, info = stored
                for j in range(replayed):
                    apply(
                        (t["a"][j], t["u"][j], t["denom"][j]),
                        t["values"][j],
                        t["keys"][j],
                        info["value_info"][j],
                        float(info["seconds"][j]),
                    )
                    bar.update(1)
            base = seconds[-1] if seconds else 0.0
            t_start, hook_start = time.perf_counter(), in_hook[0]
            for k, req in enumerate(reqs[replayed:], replayed + 1):
                pk = prompt_keys(model, tok, req, templates, layer)
                k_star = compute_keys(pk[None], sizes, hp.key_averaging)[0]
                k_res = k_star if hp.residual_key == "mean" else pk[0]
                vals, info = optimize_batch(model, tok, [req], vhp, templates, layer)
                v_star = vals["mlp"][0].detach()
                W_now = layout.get_weight(model, "mlp_out", layer).detach()
                f = rank_one_factors(W_now, bias, C, k_star, k_res, v_star)
                secs = base + time.perf_counter() - t_start - (in_hook[0] - hook_start)
                apply(f, v_star.float().cpu(), k_res.float().cpu(), info[0], secs)
                bar.update(1)
                if ckpt_path is not None and (k % checkpoint_every == 0 or k == len(reqs)):
                    _save_checkpoint(ckpt_path, ckpt_key, reqs, factors, values, keys, infos, seconds)
    except BaseException:
        restore_weights(model, originals)
        raise
    # Δ = the sum of the computed rank-one updates (float64 -> float32), as the shared editor reports its Δ;
    # W - W0 differs from it only by the rounding of the in-place float32 additions
    deltas = {name: total.float()}
    return make_result(
        "rome",
        model,
        originals,
        deltas,
        hparams=hp,
        layers=(layer,),
        requests=reqs,
        values={"mlp": torch.stack(values)},
        keys={name: torch.stack(keys)},
        stats={name: C},
        value_info=infos,
        context_templates=groups,
        timings={"total": seconds[-1], "replayed": replayed, "wall": time.perf_counter() - t0 - in_hook[0]},
    )
