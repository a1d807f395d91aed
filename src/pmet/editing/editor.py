"""The editor shared by PMET, MEMIT and the ablations: :func:`apply_shared_editor`.

Algorithm (MEMIT's ``execute_memit``, which PMET's ``execute_pmet`` follows):

1. check every request (before anything else, so a bad request never leaves a half-edited model);
2. context templates (:mod:`.context`), key statistics ``E[kk^T]`` for every critical layer (from the
   unedited model), target values ``V1`` at ``L = max(R)`` (:mod:`.values`, cached per request);
3. for each critical layer ``l`` in increasing order (and, for "w/ W_O^MHSA", for W_O^MHSA then W_O^FFN):
   keys ``K1`` at ``l`` from the *current*, partly edited model (Eq. 12), the current outputs at the value
   site at ``L`` on the plain prompts (MEMIT's ``cur_zs``: ``m^L`` / ``a^L`` for PMET, ``h^L`` for MEMIT),
   ``R = V1 - current``, ``R^l = R / sqrt(n)`` (PMET) or ``R / n`` (MEMIT) with ``n`` the number of
   critical layers from ``l`` to ``L`` (Eq. 11), ``Δ^l = R^l K1^T (λ C0 + K1 K1^T)^{-1}`` (Eq. 9) and
   ``W^l += Δ^l``.

The weights are changed in place; :meth:`pmet.editing.result.EditResult.restore` puts the originals back
bit for bit. Callers normally go through :func:`pmet.editing.edit` (the registry), which loads the
hyperparameters.

Differences from the released code, on purpose: keys of W_O^MHSA are recomputed right before W_O^MHSA is
updated and keys of W_O^FFN right before W_O^FFN (the authors compute both once per layer for GPT-J, whose
parallel blocks make that equivalent; for sequential blocks the W_O^MHSA update changes the FFN keys);
``Δ`` is solved in float64 without an explicit inverse (PMET's code calls ``torch.inverse``); the key
statistics are the streamed ``E[kk^T]`` of :mod:`pmet.stats` (WikiText tokens rather than Wikipedia
articles).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hooks import Trace
from ..stats import key_second_moments
from . import core
from .context import flatten, get_context_templates
from .hparams import EditHparams
from .partial_forward import positions
from .requests import normalize_requests
from .result import EditResult
from .tokens import encode_with_subject, pad_id_of, pad_right
from .values import compute_values

KEY_SITE = {"mlp_out": "mlp_key", "attn_out": "attn_key"}


@torch.no_grad()
def _at_subject(
    model: nn.Module, tok, templates: list[str], subjects: list[str], sites: list[tuple[str, int]], batch_rows: int = 64
) -> dict[tuple[str, int], torch.Tensor]:
    """The tensors at ``sites`` at the subject's last token of each ``template`` filled with its subject:
    ``{site: [n, d]}`` (float32, model device). The forward pass stops after the deepest site's block."""
    device = next(model.parameters()).device
    encoded = [encode_with_subject(tok, t, s) for t, s in zip(templates, subjects)]
    stop = ("block", max(l for _, l in sites))
    out = {s: [] for s in sites}
    for start in range(0, len(encoded), batch_rows):
        chunk = encoded[start : start + batch_rows]
        ids, mask = pad_right([c[0] for c in chunk], pad_id_of(tok), device)
        look = torch.tensor([c[1] for c in chunk], device=device)
        with Trace(model, record=sites, stop_after=stop) as tr:
            model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        for s in sites:  # each site on its layer's device (device_map="auto" spreads layers over GPUs)
            t = tr[s]
            out[s].append(t[torch.arange(len(chunk), device=t.device), look.to(t.device)].float())
    return {s: torch.cat(v) for s, v in out.items()}


def collect_keys(
    model: nn.Module,
    tok,
    requests: list[dict],
    layer: int,
    templates: list[list[str]],
    component: str = "mlp_key",
    averaging: str = "groups",
) -> torch.Tensor:
    """Eq. 12: ``K1`` rows ``[n, d_in]``, the input of the edited weight at the subject's last token of
    ``context.format(prompt)`` averaged over the context templates (MEMIT ``compute_ks``)."""
    flat, groups = flatten(templates)
    texts = [t.format(r["prompt"]) for r in requests for t in flat]
    subjects = [r["subject"] for r in requests for _ in flat]
    k = _at_subject(model, tok, texts, subjects, [(component, layer)])[(component, layer)]
    return core.compute_keys(k.view(len(requests), len(flat), -1), groups, averaging)


def current_outputs(model: nn.Module, tok, requests: list[dict], site: tuple[str, int]) -> torch.Tensor:
    """The current vector at ``site`` (e.g. ``("mlp", L)``) at the subject's last token of each plain
    prompt (MEMIT's ``cur_zs``): ``[n, d]``."""
    return _at_subject(model, tok, [r["prompt"] for r in requests], [r["subject"] for r in requests], [site])[site]


def edited_components(hp: EditHparams) -> list[str]:
    """The weights the shared editor writes per critical layer: W_O^FFN, plus W_O^MHSA for "w/ W_O^MHSA"."""
    return (["attn_out"] if hp.update_attn_weights else []) + ["mlp_out"]


def key_statistics(model: nn.Module, tok, hp: EditHparams, layers, cache_dir=None, progress: bool = True) -> dict:
    """``{component: {layer: E[kk^T]}}`` of the unedited model for every weight :func:`edited_components`
    names (C0 = λ · this, Eq. 9), from the statistics cache or streamed once (:mod:`pmet.stats`)."""
    return {
        comp: key_second_moments(
            model,
            tok,
            list(layers),
            component=KEY_SITE[comp],
            n_tokens=hp.mom2_n_tokens,
            dtype=hp.mom2_dtype,
            corpus=hp.mom2_corpus,
            cache_dir=cache_dir,
            progress=progress,
        )
        for comp in edited_components(hp)
    }


def apply_shared_editor(
    model: nn.Module,
    tok,
    requests,
    hparams: EditHparams,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    use_value_cache: bool = True,
    prior_keys: dict[str, torch.Tensor] | None = None,
    context_templates: list[list[str]] | None = None,
) -> EditResult:
    """Edit ``model`` in place with PMET, MEMIT or an ablation (``hparams.method`` and its switches) so that
    each request's prompt continues with its ``target_new`` (module docstring). ``cache_dir``: context
    templates, key statistics and value vectors (default ``$PMET_CACHE_DIR``); ``use_value_cache=False``
    recomputes the values; ``context_templates`` (groups of ``"...{}"`` prefixes, e.g. ``[["{}"], [...]]``)
    replaces the generated ones (benchmarks use fixed ones). Works on the model's device and dtype.

    ``hparams.null_space`` (``pmet-ns``, ``memit-ns``): each ``Δ^l`` is AlphaEdit's projected solve
    (:func:`pmet.editing.core.solve_update_null_space`) with ``P`` from the same ``C0``, instead of Eq. 9;
    ``prior_keys`` (weight name -> ``Kp Kpᵀ``, the keys of earlier edits of a sequential run,
    :func:`pmet.sequential.run_sequential`) enter it as AlphaEdit's sequential term. Without
    ``null_space`` ``prior_keys`` must be None."""
    if prior_keys is not None and not hparams.null_space:
        raise ValueError("prior_keys are used by the null-space solve only (null_space=True: pmet-ns, memit-ns)")
    t0 = time.perf_counter()
    reqs = normalize_requests(requests, tok)
    hp = hparams
    layout = model.layout
    layers = tuple(sorted(hp.layers if hp.layers is not None else layout.critical_layers))
    if not layers or min(layers) < 0 or max(layers) >= layout.n_layers:
        raise ValueError(f"critical layers {layers} out of range for a {layout.n_layers}-layer model")
    L = layers[-1]
    was_training = model.training
    model.eval()
    components = edited_components(hp)
    value_name = {"attn_out": "attn", "mlp_out": "block" if hp.value_site == "block" else "mlp"}
    timings = {}

    templates = context_templates or get_context_templates(
        model, tok, hp.context_length, hp.context_n_per_start, hp.context_seed, cache_dir=cache_dir
    )
    flat, _ = flatten(templates)
    t1 = time.perf_counter()
    timings["context_templates"] = t1 - t0

    mom2 = key_statistics(model, tok, hp, layers, cache_dir=cache_dir, progress=progress)
    t2 = time.perf_counter()
    timings["key_statistics"] = t2 - t1

    V, value_info = compute_values(
        model, tok, reqs, hp, flat, L, cache_dir=cache_dir, use_cache=use_value_cache, progress=progress
    )
    t3 = time.perf_counter()
    timings["values"] = t3 - t2

    names = {(comp, l): layout.weight_name(comp, l) for l in layers for comp in components}
    originals = {n: model.get_parameter(n).detach().clone() for n in names.values()}
    deltas, keys, stats, resids, resid_norms = {}, {}, {}, {}, {}
    try:
        for i, l in enumerate(tqdm(layers, desc=f"{hp.method}: updating layers", disable=not progress)):
            for comp in components:
                name = names[comp, l]
                wdev = model.get_parameter(name).device  # K, R and Δ live on the edited weight's device
                K = collect_keys(model, tok, reqs, l, templates, KEY_SITE[comp], hp.key_averaging).to(wdev)
                cur = current_outputs(model, tok, reqs, (value_name[comp], L))
                R = core.residual(V[value_name[comp]].to(wdev), cur)
                Rl = core.spread_residual(R, len(layers) - 1, i, hp.spread)
                C0 = mom2[comp][l]
                if hp.null_space:
                    P = core.null_space_projector(C0, hp.null_space_threshold)
                    prior = (prior_keys or {}).get(name)
                    delta = core.solve_update_null_space(Rl, K.T, P, hp.null_space_alpha, prior)
                else:
                    delta = core.solve_update(Rl, K.T, C0, hp.mom2_update_weight)
                layout.add_to_weight(model, comp, l, delta)
                deltas[name] = delta.float().cpu()
                keys[name] = K.cpu()
                stats[name] = C0
                resids[name] = Rl.cpu()
                resid_norms[name] = float(R.norm(dim=0).mean())
    except BaseException:
        with torch.no_grad():
            for n, w0 in originals.items():
                model.get_parameter(n).copy_(w0)
        raise
    finally:
        model.train(was_training)
    timings["update"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    return EditResult(
        method=hp.method,
        hparams=hp,
        layers=layers,
        requests=reqs,
        deltas=deltas,
        values={k: v.detach().cpu() for k, v in V.items()},
        keys=keys,
        stats=stats,
        residuals=resids,
        residual_norms=resid_norms,
        value_info=value_info,
        context_templates=templates,
        timings=timings,
        _model=model,
        _originals=originals,
    )
