"""Batched teacher-forced scoring of target strings after prompts (shared by CounterFact and zsRE).

One *pair* is ``(prompt, target)``; the model reads ``prompt_ids + target_ids`` and for every target token
we keep its negative log-likelihood and whether it is the argmax prediction (teacher forcing: the
prediction for target token ``j`` is conditioned on the true target tokens ``< j``). This is exactly
what MEMIT's ``test_batch_prediction`` (CounterFact: mean per-token NLL, all-tokens-argmax accuracy) and
its zsRE ``test_batch_prediction_acc`` (per-token argmax accuracy) compute, one record at a time.

Tokenization conventions (documented choices, all following MEMIT):

* the prompt is tokenized on its own with the tokenizer's default special tokens (MEMIT: ``tok(prefixes)``);
* the target is tokenized on its own **with a leading space** (``" " + target``, MEMIT:
  ``tok(f" {target}")``) and without special tokens (MEMIT's call would add a BOS for tokenizers that
  add one, e.g. Llama's; that is a known MEMIT quirk which AlphaEdit patches by dropping it);
* the model input is the concatenation of the two id lists. MEMIT tokenizes the string
  ``f"{prompt} {target}"`` instead and reads positions from the separately tokenized prefix; the two agree
  whenever the tokenizer splits at the space (byte-level BPE does: GPT-2/J/NeoX, SmolLM2); concatenating ids
  keeps positions correct when it does not.

Speed: all pairs of a call are de-duplicated, length-sorted and packed into right-padded batches under a
token budget, a batch closing at a change of row length once it holds 2,048 tokens (so padding stays small).
Rows are shared exactly (causal model): target token ``j`` needs only the row
``prompt + target[:j]``, so both candidate targets of a prompt are read from one row when their leading
tokens allow (e.g. two single-token targets share the row that is just the prompt), otherwise from two rows
of the same batch. The vocabulary projection is
applied only at target positions: we run the model *body* (``model.base_model``, whose output already
includes the final norm) and apply ``model.get_output_embeddings()`` to the gathered hidden states. That is
checked once per model against the full ``model(...).logits`` path on a small input
(:func:`fast_path_ok`); models where the two differ (e.g. logit soft-capping or scaling in the LM head
wrapper) automatically use the full path. Hooks registered on the top-level model's ``forward`` do not
fire on the fast path (hooks on submodules do); pass ``fast=False`` for such models.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "PairScore",
    "target_ids",
    "prompt_ids",
    "score_pairs",
    "score_id_pairs",
    "fast_path_ok",
    "body_and_head",
    "DEFAULT_MAX_BATCH_TOKENS",
    "DEFAULT_MIN_BATCH_TOKENS",
]

DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_BATCH_ROWS = 512
DEFAULT_MIN_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class PairScore:
    """Scores of one target after one prompt: per-token NLL (nats) and per-token argmax correctness."""

    token_nll: np.ndarray  # float64 [n_target_tokens]
    token_correct: np.ndarray  # bool [n_target_tokens]

    @property
    def nll(self) -> float:
        """Mean per-token NLL (MEMIT's ``probs`` entries); ``exp(-nll)`` is the per-token geometric-mean prob."""
        return float(self.token_nll.mean())

    @property
    def all_correct(self) -> bool:
        """Every target token is the argmax prediction (MEMIT CounterFact ``*_prompts_correct``)."""
        return bool(self.token_correct.all())

    @property
    def token_accuracy(self) -> float:
        """Fraction of target tokens predicted by argmax (MEMIT zsRE, per record)."""
        return float(self.token_correct.mean())


# ----------------------------------------------------------------------------------------- tokenization
_TOK_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_for(tok) -> dict:
    try:
        return _TOK_CACHE.setdefault(tok, {})
    except TypeError:  # tokenizer not weak-referenceable: no caching
        return {}


def prompt_ids(tok, prompt: str) -> list[int]:
    """Token ids of a prompt (tokenizer's default special tokens, as MEMIT); cached per tokenizer."""
    cache = _cache_for(tok)
    key = ("p", prompt)
    if key not in cache:
        cache[key] = list(tok(prompt)["input_ids"])
    return cache[key]


def target_ids(tok, target: str, leading_space: bool = True) -> list[int]:
    """Token ids of a target string, ``" " + target`` by default (MEMIT), no special tokens; cached."""
    cache = _cache_for(tok)
    key = ("t", target, leading_space)
    if key not in cache:
        ids = list(tok((" " + target) if leading_space else target, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"target {target!r} tokenizes to nothing")
        cache[key] = ids
    return cache[key]


# ------------------------------------------------------------------------------------ model plumbing
def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(base_model, output_embeddings)`` when the model exposes both, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return None
    return body, head


_FAST_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def fast_path_ok(model: nn.Module) -> bool:
    """Whether ``head(body(x).last_hidden_state)`` equals ``model(x).logits`` (checked once per model)."""
    try:
        return _FAST_OK[model]
    except (KeyError, TypeError):
        pass
    ok = False
    parts = body_and_head(model)
    if parts is not None:
        body, head = parts
        vocab = head.weight.shape[0]
        dev = head.weight.device
        ids = (torch.arange(1, 13, device=dev).view(2, 6) * 7919) % max(vocab - 1, 1)
        mask = torch.ones_like(ids)
        try:
            full = model(input_ids=ids, attention_mask=mask).logits.float()
            h = body(input_ids=ids, attention_mask=mask).last_hidden_state
            fast = head(h).float()
            scale = full.abs().max().clamp_min(1.0)
            ok = bool(full.shape == fast.shape and ((full - fast).abs().max() / scale) < 1e-4)
        except Exception:  # noqa: BLE001 - any failure means "use the full path"
            ok = False
    try:
        _FAST_OK[model] = ok
    except TypeError:
        pass
    return ok


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tok) -> int:
    if tok is not None:
        for v in (tok.pad_token_id, tok.eos_token_id):
            if v is not None:
                return int(v)
    return 0


# ------------------------------------------------------------------------------------------- scoring
def _batches(
    lengths: Sequence[int], max_tokens: int, max_rows: int, min_tokens: int | None = DEFAULT_MIN_BATCH_TOKENS
) -> list[list[int]]:
    """Index batches of length-sorted (descending) rows with rows * max_len <= max_tokens.

    With ``min_tokens`` a batch is also closed at a change of row length once it holds ``min_tokens``
    tokens, so rows are padded only inside small batches (right padding is pure waste: on a CPU the
    forward costs the same per padded token as per real one). ``min_tokens=None`` is the packing before
    issue 20 (fill each batch to the budget), which padded ~80% extra tokens on CounterFact. The default
    2,048 rather than smaller: with 2 threads on a loaded machine every op pays a thread barrier, and
    512-token batches measured slower than the old packing (README, Performance).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and (
            m * (len(cur) + 1) > max_tokens
            or len(cur) >= max_rows
            or (min_tokens is not None and lengths[i] < cur_max and cur_max * len(cur) >= min_tokens)
        ):
            out.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def score_id_pairs(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int = 0,
    fast: bool | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    min_batch_tokens: int | None = DEFAULT_MIN_BATCH_TOKENS,
) -> list[PairScore]:
    """Score ``(prompt_ids, target_ids)`` pairs; results in input order.

    ``fast=None`` uses the body+unembedding path when :func:`fast_path_ok`; ``False`` forces full logits.
    ``min_batch_tokens`` controls padding (see :func:`_batches`; ``None``: the packing before issue 20).
    Right padding never reaches a real position (causal attention), so the batching changes scores
    only through float rounding of differently shaped kernels.

    Rows are shared exactly: the prediction for target token ``j`` only depends on ``prompt + target[:j]``
    (causal model), so a target needs the row ``prompt + target[:-1]``, and every target whose
    ``target[:-1]`` is a prefix of another one's row is read from that row. Both CounterFact candidates of
    a prompt whose first tokens differ and are single tokens thus share one row (the prompt itself);
    identical pairs are computed once.
    """
    if not pairs:
        return []
    use_fast = fast_path_ok(model) if fast is None else bool(fast)
    parts = body_and_head(model) if use_fast else None
    if use_fast and parts is None:
        raise ValueError("fast scoring needs model.base_model and model.get_output_embeddings()")
    keys: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    uniq: dict = {}
    index = []
    for p, t in pairs:
        if len(p) == 0 or len(t) == 0:
            raise ValueError("prompt and target must each have at least one token")
        key = (tuple(p), tuple(t))
        if key not in uniq:
            uniq[key] = len(keys)
            keys.append(key)
        index.append(uniq[key])
    # rows: per prompt, the maximal contexts target[:-1] (others are prefixes of them)
    ctx_by_prompt: dict[tuple[int, ...], set] = {}
    for p, t in keys:
        ctx_by_prompt.setdefault(p, set()).add(t[:-1])
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    row_of: dict = {}
    for p, ctxs in ctx_by_prompt.items():
        maximal = [c for c in ctxs if not any(len(o) > len(c) and o[: len(c)] == c for o in ctxs)]
        for c in sorted(maximal):
            row_of[(p, c)] = len(rows)
            rows.append((p, c))
    pair_row = []
    for p, t in keys:
        c = t[:-1]
        r = row_of.get((p, c))
        if r is None:
            r = next(row_of[(p, o)] for o in ctx_by_prompt[p] if (p, o) in row_of and o[: len(c)] == c)
        pair_row.append(r)
    pairs_of_row: dict[int, list[int]] = {}
    for k, r in enumerate(pair_row):
        pairs_of_row.setdefault(r, []).append(k)

    lengths = [len(p) + len(c) for p, c in rows]
    dev = _device(model)
    results: list[PairScore | None] = [None] * len(keys)
    for batch in _batches(lengths, max_batch_tokens, max_batch_rows, min_batch_tokens):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        sel_r, sel_c, offset = [], [], {}
        for b, i in enumerate(batch):
            p, c = rows[i]
            seq = p + c
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            offset[i] = len(sel_r)
            for col in range(len(p) - 1, len(seq)):  # predictions after prompt + c[:j], j = 0..len(c)
                sel_r.append(b)
                sel_c.append(col)
        ids, mask = ids.to(dev), mask.to(dev)
        rr = torch.tensor(sel_r, device=dev)
        cc = torch.tensor(sel_c, device=dev)
        if parts is not None:
            h = parts[0](input_ids=ids, attention_mask=mask).last_hidden_state
            logits = parts[1](h[rr, cc])
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[rr, cc]
        logits = logits.float()
        logz = torch.logsumexp(logits, dim=-1)
        top = logits.argmax(-1)
        # gather every target token of every pair read from this batch's rows
        q_pos, q_tok, q_owner = [], [], []
        for i in batch:
            for k in pairs_of_row[i]:
                t = keys[k][1]
                for j, tok_id in enumerate(t):
                    q_pos.append(offset[i] + j)
                    q_tok.append(tok_id)
                    q_owner.append(k)
        qp = torch.tensor(q_pos, device=dev)
        qt = torch.tensor(q_tok, device=dev)
        nll = (logz[qp] - logits[qp, qt]).double().cpu().numpy()
        correct = (top[qp] == qt).cpu().numpy()
        start = 0
        for i in batch:
            for k in pairs_of_row[i]:
                n = len(keys[k][1])
                results[k] = PairScore(nll[start : start + n].copy(), correct[start : start + n].copy())
                start += n
    return [results[k] for k in index]  # type: ignore[misc]


def score_pairs(
    model: nn.Module,
    tok,
    pairs: Sequence[tuple[str, str]],
    *,
    leading_space: bool = True,
    **kwargs,
) -> list[PairScore]:
    """Score ``(prompt, target)`` string pairs (target gets ``" "`` prepended unless ``leading_space=False``)."""
    id_pairs = [(prompt_ids(tok, p), target_ids(tok, t, leading_space)) for p, t in pairs]
    return score_id_pairs(model, id_pairs, pad_id=_pad_id(tok), **kwargs)
