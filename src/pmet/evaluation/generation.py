"""Generation metrics of CounterFact: fluency (n-gram entropy) and consistency (TF-IDF reference score).

Follows ROME/MEMIT (``experiments/py/eval_utils_counterfact.py: test_generation`` and
``util/generate.py: generate_fast``):

* **Generation**: top-k sampling with ``top_k=5``, temperature 1, ``max_out_len=100`` *total* tokens
  (prompt included), no stop at EOS, one sample per generation prompt. The text is the decoded prompt +
  continuation, NFKD-normalised, ``"\\n\\n"`` replaced by ``" "`` and special tokens dropped (ROME drops
  ``<|endoftext|>``). Ours is batched (128 prompts, from many records, per decode step) with left padding,
  explicit position ids and a preallocated KV cache (:func:`_decode_static`); the random draws are
  seeded per prompt (``seed`` and a caller-given key such as ``(case_id, j)``) from a private
  ``torch.Generator``, so results are deterministic, do not touch the global RNG and do not depend on
  which other prompts share the batch (up to float rounding of padded batches).
* **Fluency** (``ngram_entropy``): per text, ``mean(2/3 * H_2, 4/3 * H_3)`` where ``H_n`` is the entropy
  (bits) of the n-gram frequency distribution over word tokens; per record the mean over its texts. Tables
  report it x100 (GPT-J: 622.4). ROME tokenizes words with ``nltk.word_tokenize``; nltk (and its punkt
  data) is not a dependency here, so we use it when it is importable *and* its data loads, otherwise a
  Treebank-style regex tokenizer (:func:`word_tokenize`) that splits punctuation and English clitics the
  same way for ordinary text. The tokenizer used is reported by :func:`word_tokenizer_name`.
* **Consistency** (``reference_score``): cosine similarity of the TF-IDF vectors of the record's
  generated texts (joined by spaces) and its reference texts (joined). Exact ROME needs
  ``attribute_snippets.json`` (Wikipedia snippets about subjects that share relation and *target_new*)
  and ROME's ``idf.npy``/``tfidf_vocab.json``; :class:`ConsistencyScorer` uses them when all three are in
  the data folder and calls the metric ``consistency``. Otherwise (the case in this repository) it
  computes the same cosine with an sklearn ``TfidfVectorizer`` (defaults, as ROME's) fitted on the shipped
  WikiText paragraphs and reference texts = up to ``max_refs`` WikiText paragraphs that contain
  target_new as a whole word (case-sensitive); when no paragraph does, it falls back to the record's
  ``attribute_prompts`` completed with target_new (sentences about other subjects that have target_new
  for the same relation, the closest thing to ROME's snippets that CounterFact ships); the metric is then
  called ``consistency_proxy`` and tables must label it "Consistency (proxy)". A text whose TF-IDF vector
  is empty gets similarity 0 (ROME would produce NaN).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .scoring import _pad_id, body_and_head, fast_path_ok, prompt_ids

__all__ = [
    "generate_fast",
    "word_tokenize",
    "word_tokenizer_name",
    "compute_n_gram_entropy",
    "n_gram_entropy",
    "tfidf_similarity",
    "ConsistencyScorer",
    "GENERATION_IMPLS",
]


# ------------------------------------------------------------------------------------------ generation
def _seed_for(seed: int, key) -> int:
    h = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _cache_kwarg(module: nn.Module) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _clean(text: str) -> str:
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")


GENERATION_IMPLS = ("static", "legacy")


@torch.no_grad()
def generate_fast(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    keys: Sequence | None = None,
    max_out_len: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    fast: bool | None = None,
    impl: str = "static",
    dtype: torch.dtype | str | None = None,
) -> list[str]:
    """Top-k sampled continuations of ``prompts`` up to ``max_out_len`` tokens in total (ROME's generate_fast).

    ``keys[i]`` (default: the prompt index) seeds prompt ``i``'s random draws together with ``seed``.
    Returns the decoded prompt + continuation of each prompt, cleaned like ROME's.

    ``impl="static"`` (default) decodes ``batch_size`` prompts at a time into a preallocated KV cache
    (:func:`_decode_static`); ``impl="legacy"`` is the implementation before issue 20 (a growing
    ``DynamicCache``, full-vocabulary softmax), kept for A/B benchmarks. Both draw the same per-prompt
    uniforms, so in float32 they give the same texts up to float rounding. ``dtype`` (e.g.
    ``torch.bfloat16``) samples from a copy of the model cast to that dtype: faster on CPUs with bf16
    matrix units, but it changes the logits (an explicit option; evaluation records it in its meta).
    """
    if impl not in GENERATION_IMPLS:
        raise ValueError(f"impl must be one of {GENERATION_IMPLS}, got {impl!r}")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError("keys must have one entry per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype is not None:
        from ..models import warn_slow_low_precision

        warn_slow_low_precision(next(model.parameters()).device, dtype, "sampling")
        model = _cast_copy(model, dtype)
    use_fast = fast_path_ok(model) if fast is None else bool(fast)
    parts = body_and_head(model) if use_fast else None
    dev = next(model.parameters()).device
    pad = _pad_id(tok)
    encoded = [prompt_ids(tok, p) for p in prompts]
    out_ids: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths together
    decode = _decode_static if impl == "static" else _decode_legacy
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        lens = [len(encoded[i]) for i in batch]
        width = max(lens)
        n_new = [max(0, max_out_len - n) for n in lens]
        steps = max(n_new)
        if steps == 0:
            for i in batch:
                out_ids[i] = list(encoded[i])
            continue
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):  # left padding
            ids[r, width - lens[r] :] = torch.tensor(encoded[i])
            mask[r, width - lens[r] :] = 1
        uniforms = torch.stack(
            [torch.rand(steps, generator=torch.Generator().manual_seed(_seed_for(seed, keys[i]))) for i in batch]
        ).to(dev)
        gen = decode(model, parts, ids.to(dev), mask.to(dev), uniforms, steps, top_k).cpu().tolist()
        for r, i in enumerate(batch):
            out_ids[i] = list(encoded[i]) + gen[r][: n_new[r]]
    return [_clean(tok.decode(x, skip_special_tokens=True)) for x in out_ids]  # type: ignore[arg-type]


def _cast_copy(model: nn.Module, dtype) -> nn.Module:
    """A copy of ``model`` with floating parameters in ``dtype`` (the original is untouched)."""
    import copy

    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if next(model.parameters()).dtype == dt:
        return model
    return copy.deepcopy(model).to(dt)


def _step_logits(model, parts, kwargs) -> tuple[torch.Tensor, object]:
    """Last-position logits (float32) and the returned cache of one forward."""
    if parts is not None:
        out = parts[0](**kwargs)
        logits = parts[1](out.last_hidden_state[:, -1])
    else:
        out = model(**kwargs)
        logits = out.logits[:, -1]
    cache = out.get("cache", None) if "cache" in out else out.get("past_key_values", None)
    return logits.float(), cache


def _decode_legacy(model, parts, ids, mask, uniforms, steps, top_k) -> torch.Tensor:
    """Decoding before issue 20: a DynamicCache grown by concatenation, softmax over the vocabulary."""
    fwd = parts[0] if parts is not None else model
    cache_kw = _cache_kwarg(fwd)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = None
    cur_ids, cur_pos = ids, pos
    generated = []
    for s in range(steps):
        kwargs = {"input_ids": cur_ids, "attention_mask": mask, "position_ids": cur_pos, "use_cache": True}
        if cache is not None:
            kwargs[cache_kw] = cache
        logits, cache = _step_logits(model, parts, kwargs)
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = torch.topk(probs, top_k, dim=-1)
        cdf = (top_p / top_p.sum(-1, keepdim=True)).cumsum(-1)
        choice = (cdf < uniforms[:, s : s + 1]).sum(-1).clamp_max(top_k - 1)
        new = top_i.gather(1, choice[:, None])
        generated.append(new)
        cur_ids = new
        cur_pos = cur_pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
    return torch.cat(generated, dim=1)


def _static_cache(model: nn.Module, max_len: int):
    """A preallocated KV cache of ``max_len`` slots for ``model`` (None when transformers lacks one).

    Each layer returns only the slots written so far (``_PrefixStaticLayer``), so attention does not
    run over the empty tail. Only for models whose layers are all full attention: sliding-window or
    hybrid layers (e.g. Gemma 3) return None and are decoded by :func:`_decode_legacy`.
    """
    try:
        from transformers import StaticCache
        from transformers.cache_utils import Cache, StaticLayer

        cache = StaticCache(config=model.config, max_cache_len=max_len)
    except Exception:  # noqa: BLE001 - old transformers or an unsupported config
        return None
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        return None
    return Cache(layers=[_prefix_layer_class()(max_cache_len=max_len) for _ in cache.layers])


@functools.lru_cache(maxsize=1)
def _prefix_layer_class():
    from transformers.cache_utils import StaticLayer

    class _PrefixStaticLayer(StaticLayer):
        """StaticLayer whose ``update`` returns views of the slots written so far (no copy, no mask tail)."""

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            n = int(self.cumulative_length)
            return keys[:, :, :n], values[:, :, :n]

    return _PrefixStaticLayer


def _decode_static(model, parts, ids, mask, uniforms, steps, top_k) -> torch.Tensor:
    """Prefill the left-padded prompts once, then one token per step into a preallocated KV cache.

    The cache has ``width + steps`` slots; slot ``s`` of every row holds the ``s``-th input of that row,
    so one boolean 4D mask (key slot visible iff it is not padding and not in the future) serves every
    step as a slice, and nothing is concatenated while decoding. Sampling: the top-k logits, their
    softmax, then ROME's inverse-CDF draw with the prompt's own uniform (the same draw as the legacy
    path, whose softmax over the whole vocabulary followed by renormalising the top k is the same
    distribution). Models without a plain static cache fall back to :func:`_decode_legacy`.
    """
    b, width = ids.shape
    total = width + steps
    fwd = parts[0] if parts is not None else model
    cache = _static_cache(model, total)
    if cache is None:
        return _decode_legacy(model, parts, ids, mask, uniforms, steps, top_k)
    cache_kw = _cache_kwarg(fwd)
    valid = torch.cat([mask.bool(), mask.new_ones(b, steps, dtype=torch.bool)], dim=1)  # [b, total]
    causal = torch.ones(total, total, dtype=torch.bool, device=ids.device).tril()
    full_mask = (causal[None] & valid[:, None, :])[:, None]  # [b, 1, total(query), total(key)]
    # padded query rows see nothing; let them see their own slot so softmax stays finite
    eye = torch.eye(total, dtype=torch.bool, device=ids.device)
    full_mask |= eye[None, None]
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":  # eager & co. add a float mask
        dt = next(model.parameters()).dtype
        full_mask = torch.zeros(full_mask.shape, dtype=dt, device=ids.device).masked_fill_(
            ~full_mask, torch.finfo(dt).min
        )
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    next_pos = pos[:, -1:] + 1
    out = torch.empty(b, steps, dtype=torch.long, device=ids.device)
    kwargs = {
        "input_ids": ids,
        "attention_mask": full_mask[:, :, :width, :width],  # keys: written slots
        "position_ids": pos,
        "use_cache": True,
        cache_kw: cache,
    }
    for s in range(steps):
        logits, _ = _step_logits(model, parts, kwargs)
        top_l, top_i = torch.topk(logits, top_k, dim=-1)
        cdf = torch.softmax(top_l, dim=-1).cumsum(-1)
        choice = (cdf < uniforms[:, s : s + 1]).sum(-1).clamp_max(top_k - 1)
        new = top_i.gather(1, choice[:, None])
        out[:, s : s + 1] = new
        slot = width + s
        kwargs = {
            "input_ids": new,
            "attention_mask": full_mask[:, :, slot : slot + 1, : slot + 1],
            "position_ids": next_pos + s,
            "use_cache": True,
            cache_kw: cache,
        }
    return out


# ------------------------------------------------------------------------------------- n-gram entropy
_WORD_RE = re.compile(
    r"""\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m|S|RE|VE|LL|D|M)\b|\w+(?:[-.'@]\w+)*|\.\.\.|--|[^\w\s]""",
    re.UNICODE,
)


@functools.lru_cache(maxsize=1)
def _nltk_tokenize() -> Callable[[str], list[str]] | None:
    try:
        import nltk  # type: ignore

        nltk.word_tokenize("Test sentence. Another one.")
        return nltk.word_tokenize
    except Exception:  # noqa: BLE001 - not installed, or punkt data missing
        return None


def word_tokenize(text: str) -> list[str]:
    """Word tokens for n-gram entropy: ``nltk.word_tokenize`` when available, else a Treebank-style regex."""
    f = _nltk_tokenize()
    return f(text) if f is not None else _WORD_RE.findall(text)


def word_tokenizer_name() -> str:
    return "nltk.word_tokenize" if _nltk_tokenize() is not None else "regex (Treebank-style approximation)"


def compute_n_gram_entropy(
    text: str,
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
    tokenize: Callable[[str], list[str]] = word_tokenize,
) -> float:
    """ROME's weighted n-gram entropy of one text: ``mean_n(w_n * H_n)``, ``H_n`` in bits."""
    tokens = tokenize(text)
    ents = []
    for n in ns:
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        freqs = np.array(list(counts.values()), dtype=np.float64)
        if freqs.size == 0:
            ents.append(0.0)
            continue
        freqs /= freqs.sum()
        ents.append(float(np.sum(-freqs * np.log2(freqs))))
    return float(np.mean(np.array(ents) * np.array(weights)))


def n_gram_entropy(texts: Iterable[str], **kwargs) -> float:
    """Arithmetic mean of :func:`compute_n_gram_entropy` over texts (ROME's ``n_gram_entropy``)."""
    vals = [compute_n_gram_entropy(t, **kwargs) for t in texts]
    return float(np.mean(vals)) if vals else float("nan")


# ------------------------------------------------------------------------------------------ consistency
def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / na / nb)


def tfidf_similarity(text_a: str, text_b: str, vec) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts under a fitted vectorizer (ROME's)."""
    enc = vec.transform([text_a, text_b]).toarray()
    return _cosine(enc[0], enc[1])


_WT_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]


def _detok_wikitext(text: str) -> str:
    for a, b in _WT_DETOK:
        text = text.replace(a, b)
    return text


class ConsistencyScorer:
    """Reference texts and TF-IDF model for CounterFact's consistency metric (exact ROME files or proxy).

    ``metric_name`` is ``"consistency"`` (ROME's attribute snippets + idf/vocab found) or
    ``"consistency_proxy"``. Reference TF-IDF vectors are computed once per (relation, target).
    """

    def __init__(
        self, data_dir: str | Path | None = None, corpus: str = "wikitext", max_refs: int = 100, mode: str = "auto"
    ):
        from ..paths import data_dir as default_data_dir

        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.corpus = corpus
        self.max_refs = max_refs
        files = [self.data_dir / f for f in ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")]
        exact_available = all(f.is_file() for f in files)
        if mode == "exact" and not exact_available:
            raise FileNotFoundError(f"exact consistency needs {', '.join(map(str, files))}")
        self.exact = exact_available and mode in ("auto", "exact")
        self.metric_name = "consistency" if self.exact else "consistency_proxy"
        self._ref_cache: dict = {}
        if self.exact:
            self._load_exact(*files)
        else:
            self._load_proxy()

    # -- exact ROME ------------------------------------------------------------------------------------
    def _load_exact(self, snip_path: Path, idf_path: Path, vocab_path: Path) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        from ..data import read_json

        idf = np.load(idf_path)
        vocab = read_json(vocab_path)
        vec = TfidfVectorizer(vocabulary=vocab)
        vec.idf_ = idf  # sklearn's setter: a fitted vectorizer with ROME's idf and vocabulary
        self.vec = vec
        snips: dict = {}
        for el in read_json(snip_path):
            snips.setdefault(el["relation_id"], {}).setdefault(el["target_id"], []).extend(el["samples"])
        self.snips = snips
        self.description = "ROME attribute_snippets.json + idf.npy/tfidf_vocab.json (exact)"

    # -- proxy -----------------------------------------------------------------------------------------
    def _load_proxy(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        from ..data import load_text_corpus

        paras = [_detok_wikitext(p) for p in load_text_corpus(self.corpus, drop_unk=True, data_dir=self.data_dir)]
        self.paragraphs = paras
        self.vec = TfidfVectorizer().fit(paras)
        self.description = (
            f"proxy: TfidfVectorizer fitted on {len(paras)} {self.corpus} paragraphs; references = "
            f"up to {self.max_refs} paragraphs mentioning target_new, else attribute_prompts + "
            "target_new"
        )

    def references(self, record) -> tuple[list[str], str]:
        """Reference texts for a CounterFactRecord and where they came from."""
        target = record.target_new
        if self.exact:
            samples = self.snips.get(record.relation_id, {}).get(record.target_new_id, [])
            return [s["text"] for s in samples], "attribute_snippets"
        key = ("corpus", target)
        if key not in self._ref_cache:
            pat = re.compile(r"(?<!\w)" + re.escape(target) + r"(?!\w)")
            hits = []
            for p in self.paragraphs:
                if target in p and pat.search(p):
                    hits.append(p)
                    if len(hits) >= self.max_refs:
                        break
            self._ref_cache[key] = hits
        hits = self._ref_cache[key]
        if hits:
            return hits, "corpus"
        refs = [p.strip() + " " + target for p in record.attribute_prompts]
        return refs, ("attribute_prompts" if refs else "none")

    def _ref_vector(self, record) -> tuple[np.ndarray | None, str, int]:
        key = (
            "vec",
            record.relation_id,
            record.target_new,
            record.target_new_id,
            tuple(record.attribute_prompts) if not self.exact else (),
        )
        if key not in self._ref_cache:
            refs, source = self.references(record)
            v = self.vec.transform([" ".join(refs)]).toarray()[0] if refs else None
            self._ref_cache[key] = (v, source, len(refs))
        return self._ref_cache[key]

    def score(self, record, generated: Sequence[str]) -> dict:
        """``{metric_name: cosine or None, "consistency_source": ..., "n_references": ...}``."""
        ref_vec, source, n = self._ref_vector(record)
        if ref_vec is None:
            return {self.metric_name: None, "consistency_source": source, "n_references": 0}
        gen_vec = self.vec.transform([" ".join(generated)]).toarray()[0]
        return {self.metric_name: _cosine(gen_vec, ref_vec), "consistency_source": source, "n_references": n}
