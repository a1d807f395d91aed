"""Key covariance statistics: ``C0 = λ E[k k^T]`` of Eq. 9 (this module computes the ``E[k k^T]`` part).

The keys of a weight are its inputs (Eq. 12), taken at every token of a Wikipedia-like corpus. The
second moment is streamed batch by batch (never materialising all keys), the model runs only up to the
deepest requested layer, and all requested layers are filled from the same forward passes; each batch's
``k^T k`` is accumulated from its upper block triangle only (:func:`add_gram`), mirrored once at the end.
Results are cached as safetensors, keyed by everything that changes them; writes are atomic, a corrupt
file is recomputed with a warning.

The authors' implementation (kmeng01/memit ``layer_stats``) samples whole Wikipedia articles truncated to
the model's context; we stream the corpus as one token sequence cut into ``seq_len`` windows, which uses
every token and needs no padding. MEMIT calls the statistic ``mom2`` and stores the mean, as we do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .hooks import Trace
from .models import model_fingerprint
from .paths import cache_dir as default_cache_dir
from .tensor_cache import load_entry, save_entry

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def corpus_token_windows(tok, texts: list[str], seq_len: int, n_tokens: int) -> torch.Tensor:
    """Tokenise ``texts`` into one stream (EOS between paragraphs) and cut ``[n_windows, seq_len]`` windows
    holding at least ``n_tokens`` tokens (fewer if the corpus is smaller)."""
    sep = tok.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tok(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if len(stream) >= n_tokens + seq_len:
            break
    n_windows = max(1, min(len(stream) // seq_len, -(-n_tokens // seq_len)))
    if len(stream) < seq_len:
        raise ValueError(f"corpus has only {len(stream)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(stream[: n_windows * seq_len]).view(n_windows, seq_len)


def _block_bounds(d: int, n_blocks: int) -> list[int]:
    return [round(i * d / n_blocks) for i in range(n_blocks + 1)]


def add_gram(acc: torch.Tensor | None, k: torch.Tensor, n_blocks: int = 4) -> torch.Tensor:
    """``acc + k^T k`` for keys ``k`` of shape ``[tokens, d]``, computing only the upper block triangle.

    The second moment is symmetric, so with the columns of ``k`` cut into ``n_blocks`` blocks only the
    ``n(n+1)/2`` blocks on and above the diagonal are multiplied (10 of 16 for 4 blocks: 62.5% of the
    arithmetic of a full ``k^T k``); the blocks below the diagonal of ``acc`` are left for
    :func:`mirror_upper`, called once at the end. ``acc`` (``[d, d]`` or None) is updated in place."""
    d = k.shape[1]
    if acc is None:
        acc = k.new_zeros(d, d)
    bounds = _block_bounds(d, n_blocks)
    for i in range(n_blocks):
        a, b = bounds[i], bounds[i + 1]
        acc[a:b, a:].addmm_(k[:, a:b].T, k[:, a:])
    return acc


def mirror_upper(acc: torch.Tensor, n_blocks: int = 4) -> torch.Tensor:
    """Fill the blocks below the diagonal left empty by :func:`add_gram` from those above it."""
    d = acc.shape[0]
    bounds = _block_bounds(d, n_blocks)
    for i in range(1, n_blocks):
        a, b = bounds[i], bounds[i + 1]
        acc[a:b, :a] = acc[:a, a:b].T
    return acc


def _cache_path(
    root: Path, fingerprint: str, component: str, layer: int, corpus: str, n_tokens: int, dtype: str, seq_len: int
) -> Path:
    return root / "stats" / fingerprint / f"{component}_l{layer}_{corpus}_n{n_tokens}_s{seq_len}_{dtype}.safetensors"


@torch.no_grad()
def key_second_moments(
    model: nn.Module,
    tok,
    layers: list[int] | tuple[int, ...],
    component: str = "mlp_key",
    n_tokens: int = 100_000,
    dtype: str = "float32",
    corpus: str = "wikitext",
    seq_len: int = 256,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """``E[k k^T]`` over ``n_tokens`` corpus tokens for the keys ``component`` (``"mlp_key"`` = input of
    W_O^FFN, ``"attn_key"`` = input of W_O^MHSA) at each of ``layers``. Returns ``{layer: [d_k, d_k]}`` in
    ``dtype`` (the accumulation precision) on the CPU.

    A second call with the same arguments loads the cache (``$PMET_CACHE_DIR/stats/...``).
    """
    from .data import corpus_id, load_text_corpus, resolve_corpus

    corpus = resolve_corpus(corpus)[0]  # "wikipedia" where it can be streamed, else the WikiText fallback
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    seq_len = min(seq_len, max_pos)
    fp = model_fingerprint(model)
    cid = corpus_id(corpus)
    results: dict[int, torch.Tensor] = {}
    paths = {}
    for layer in layers:
        key = {
            "model": fp,
            "component": component,
            "layer": layer,
            "corpus": cid,
            "n_tokens": n_tokens,
            "dtype": dtype,
            "seq_len": seq_len,
        }
        path = _cache_path(root, fp, component, layer, cid, n_tokens, dtype, seq_len)
        hit = load_entry(path, json.dumps(key, sort_keys=True), ["mom2"])
        if hit is not None:
            results[layer] = hit[0]["mom2"]
        else:
            paths[layer] = (path, key)
    if not paths:
        return results

    todo = sorted(paths)
    sites = [(component, l) for l in todo]
    cap = 16 * (n_tokens + seq_len) if corpus == "wikipedia" else None  # a streamed corpus is read only so far
    windows = corpus_token_windows(tok, load_text_corpus(corpus, max_chars=cap), seq_len, n_tokens)
    device = next(model.parameters()).device
    acc = {l: None for l in todo}
    count = 0
    bar = tqdm(
        total=min(n_tokens, windows.numel()),
        desc=f"E[kk^T] {component} layers {todo}",
        unit="tok",
        disable=not progress,
    )
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        with Trace(model, record=sites, stop_after=sites[-1]) as tr:
            model(input_ids=ids, use_cache=False)
        take = min(ids.numel(), n_tokens - count)
        for l in todo:
            k = tr[component, l].reshape(-1, tr[component, l].shape[-1])[:take].to(DTYPES[dtype])
            acc[l] = add_gram(acc[l], k)
        count += take
        bar.update(take)
        if count >= n_tokens:
            break
    bar.close()
    for l in todo:
        mom2 = (mirror_upper(acc[l]) / count).cpu()
        path, key = paths[l]
        save_entry(path, {"mom2": mom2}, json.dumps(key, sort_keys=True), {"count": count})
        results[l] = mom2
    return results
