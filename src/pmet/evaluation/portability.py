"""Portability: does an edit carry over to a question that follows from it? (EasyEdit's one-hop set.)

EasyEdit's "One Hop" CounterFact file (``counterfact/raw/counterfact_portability_gpt4.json``, 1,031 records,
SOURCES.md) gives each record a ``portability`` question whose answer follows from the *new* fact, e.g. for
"Spike Hughes originates from London -> Philadelphia": *"What famous food is associated with the city where
Spike Hughes originates from?"* -> *"Cheesesteaks"*. The merged CounterFact subset dropped the field, so it is
joined back by ``case_id`` (:func:`load_portability`).

Definition (EasyEdit, ``easyeditor/evaluate/portability_evaluate.py``: ``compute_portability_quality`` calls
``test_prediction_acc`` of ``evaluate_utils.py``): the model reads ``New Question + " " + New Answer``
(teacher forcing) and the record's portability is the fraction of the answer's tokens that are the argmax
prediction at their position. Here that is :attr:`pmet.evaluation.scoring.PairScore.token_accuracy` of the
pair (question, answer), tokenised as every other CounterFact score (:mod:`pmet.evaluation.scoring`: the
question with the tokenizer's default special tokens, the answer with a leading space and none). A record
with several questions averages them (the file has one per record). The summary reports the mean over the
records that have a question, in percent, with its interval and ``portability_n`` (how many records).

Caveat (SOURCES.md): EasyEdit's file deleted every non-ASCII character, so a few questions and answers have
names without their accented letters; the edit requests themselves come from the repaired merged file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .scoring import DEFAULT_MAX_BATCH_TOKENS, _pad_id, prompt_ids, score_id_pairs, target_ids

__all__ = ["PORTABILITY_FILE", "load_portability", "score_portability", "summarize_portability"]

PORTABILITY_FILE = "counterfact/raw/counterfact_portability_gpt4.json"


def _load(path: Path) -> dict[int, tuple[tuple[str, str], ...]]:
    from ..data import _read_json  # parsed once per file version (path, mtime, size)

    out: dict[int, tuple[tuple[str, str], ...]] = {}
    for r in _read_json(path):
        items = r.get("portability") or []
        items = [items] if isinstance(items, dict) else items
        pairs = tuple(
            (str(p["New Question"]).strip(), str(p["New Answer"]).strip())
            for p in items
            if str(p.get("New Question", "")).strip() and str(p.get("New Answer", "")).strip()
        )
        if pairs:
            out[int(r["case_id"])] = pairs
    return out


def load_portability(data_dir=None) -> dict[int, tuple[tuple[str, str], ...]]:
    """``{case_id: ((New Question, New Answer), ...)}`` of EasyEdit's one-hop CounterFact portability set."""
    from ..data import ensure_file

    return _load(ensure_file(PORTABILITY_FILE, data_dir))  # the file $PMET_DATA_DIR points at now, never stale


def score_portability(
    model: nn.Module,
    tok,
    records: Sequence,
    questions: dict | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> dict[int, float]:
    """``{case_id: portability}`` (module docstring; a fraction in [0, 1]) for the ``records`` (anything with
    a ``case_id``) that have a portability question; ``questions`` defaults to :func:`load_portability`."""
    questions = load_portability() if questions is None else questions
    pairs, owners = [], []
    for rec in records:
        for q, a in questions.get(int(rec.case_id), ()):
            pairs.append((prompt_ids(tok, q), target_ids(tok, a)))
            owners.append(int(rec.case_id))
    scores = score_id_pairs(model, pairs, pad_id=_pad_id(tok), max_batch_tokens=max_batch_tokens)
    per: dict[int, list[float]] = {}
    for cid, s in zip(owners, scores):
        per.setdefault(cid, []).append(s.token_accuracy)
    return {cid: sum(v) / len(v) for cid, v in per.items()}


def summarize_portability(scores: dict[int, float], confidence: float = 0.95, seed: int = 0) -> dict:
    """``portability`` (percent), ``portability_ci``, ``portability_n`` (records) and ``portability_ci_method``
    by the tables' interval rule (:func:`pmet.evaluation.stats.metric_ci`); empty when no record has one."""
    from .stats import metric_ci

    if not scores:
        return {}
    c = metric_ci(list(scores.values()), confidence=confidence, seed=seed).scaled(100.0)
    return {
        "portability": c.mean,
        "portability_ci": (c.low, c.high),
        "portability_n": c.n,
        "portability_ci_method": c.method,
    }
