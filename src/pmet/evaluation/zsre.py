"""zsRE evaluation (MEMIT's ``compute_rewrite_quality_zsre`` + ``MENDQADataset``; PMET Table 2).

Per record, with teacher forcing (the prediction for answer token ``j`` is conditioned on the true
tokens ``< j``) and top-1 over the full vocabulary:

* ``efficacy``       = fraction of the target's tokens (``" " + target``) that are the argmax prediction after
                       the question ``src`` (used verbatim; it already ends with ``"?"``);
* ``generalization`` = the same after ``rephrase`` (verbatim);
* ``specificity``    = the same for ``" " + loc_ans`` after ``loc + "?"`` (MEMIT appends ``"?"`` to the
                       ``"nq question: ..."`` prompt; no space before the answer's leading space).

The record's value is the mean over tokens (MEMIT ``np.mean(*_prompts_correct)``); summaries average
over records and report percent. MEMIT builds one prompt per token by decoding ``target_tok[:i]`` back to
text and re-tokenizing; we feed the token ids directly, which is the same whenever decoding round-trips.

Target: ``target="memit"`` (default) edits and evaluates towards ``answers[0]`` (the gold answer), which is
what MEMIT's ``MENDQADataset`` does and what the paper's Table 2 numbers use; ``target="alt"`` uses the
counterfactual ``alt`` (EasyEdit convention). It must match the target the editor was given
(``ZsreRecord.as_request(target)``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .results import ResultsFile, evaluate_resumable
from .scoring import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MIN_BATCH_TOKENS,
    _pad_id,
    prompt_ids,
    score_id_pairs,
    target_ids,
)
from .stats import ci_by_rule, format_ci

__all__ = ["evaluate_zsre", "summarize_zsre", "zsre_table", "ZSRE_METRICS", "zsre_target"]

METRIC_VERSION = 1
ZSRE_METRICS = ["efficacy", "generalization", "specificity"]


def zsre_target(rec, target: str = "memit") -> str:
    return rec.as_request(target)["target_new"]


def _score(
    model, tok, records, target, fast, max_batch_tokens, min_batch_tokens: int | None = DEFAULT_MIN_BATCH_TOKENS
) -> list[dict]:
    pairs = []
    for rec in records:
        t_ids = target_ids(tok, zsre_target(rec, target))
        pairs.append((prompt_ids(tok, rec.src), t_ids))
        pairs.append((prompt_ids(tok, rec.rephrase), t_ids))
        pairs.append((prompt_ids(tok, rec.loc + "?"), target_ids(tok, rec.loc_ans)))
    scores = score_id_pairs(
        model,
        pairs,
        pad_id=_pad_id(tok),
        fast=fast,
        max_batch_tokens=max_batch_tokens,
        min_batch_tokens=min_batch_tokens,
    )
    rows = []
    for i, rec in enumerate(records):
        s_src, s_reph, s_loc = scores[3 * i : 3 * i + 3]
        rows.append(
            {
                "case_id": rec.case_id,
                "target": zsre_target(rec, target),
                "efficacy": s_src.token_accuracy,
                "generalization": s_reph.token_accuracy,
                "specificity": s_loc.token_accuracy,
                "rewrite_correct": s_src.token_correct.tolist(),
                "paraphrase_correct": s_reph.token_correct.tolist(),
                "neighborhood_correct": s_loc.token_correct.tolist(),
                "rewrite_nll": s_src.nll,
                "paraphrase_nll": s_reph.nll,
                "neighborhood_nll": s_loc.nll,
            }
        )
    return rows


def evaluate_zsre(
    model: nn.Module,
    tok,
    records: Sequence,
    batch_size: int = 128,
    out_path=None,
    progress: bool = True,
    *,
    target: str = "memit",
    fast: bool | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    meta: dict | None = None,
    impl: str = "fast",
) -> list[dict]:
    """Evaluate ``model`` on zsRE records; one result dict per record in ``records`` order (resumable
    through ``out_path`` like :func:`pmet.evaluation.counterfact.evaluate_counterfact`; ``impl="legacy"``
    is its batching before issue 20, kept for A/B benchmarks)."""
    if impl not in ("fast", "legacy"):
        raise ValueError(f"impl must be 'fast' or 'legacy', got {impl!r}")
    min_tokens = None if impl == "legacy" else DEFAULT_MIN_BATCH_TOKENS
    if target not in ("memit", "alt"):
        raise ValueError(f"target must be 'memit' or 'alt', got {target!r}")
    file_meta = {"dataset": "zsre", "target": target, "metric_version": METRIC_VERSION, **(meta or {})}
    store = ResultsFile(out_path, file_meta) if out_path is not None else None
    return evaluate_resumable(
        records,
        lambda chunk: _score(model, tok, chunk, target, fast, max_batch_tokens, min_tokens),
        batch_size,
        store,
        "zsRE eval",
        progress,
    )


def summarize_zsre(
    rows: Sequence[dict], ci: str = "auto", confidence: float = 0.95, seed: int = 0, n_resamples: int = 9999
) -> dict:
    """Means over records in percent with ``<m>_ci``, ``<m>_n`` and ``<m>_ci_method``, as
    :func:`pmet.evaluation.counterfact.summarize_counterfact`. Per-record values are token fractions, so
    ``ci="auto"`` gives a percentile bootstrap over records (Wilson where every value is 0 or 1)."""
    rows = [r for r in rows if r is not None]
    out: dict = {"dataset": "zsre", "n_records": len(rows), "ci_method": ci, "confidence": confidence}
    for m in ZSRE_METRICS:
        vals = [r[m] for r in rows if r.get(m) is not None]
        if not vals:
            continue
        c = ci_by_rule(vals, ci, confidence, seed, n_resamples).scaled(100.0)
        out[m], out[f"{m}_ci"], out[f"{m}_n"], out[f"{m}_ci_method"] = c.mean, (c.low, c.high), c.n, c.method
    return out


def zsre_table(summaries: dict, with_n: bool = True):
    """pandas DataFrame in the layout of the paper's Table 2."""
    import pandas as pd

    recs = []
    for name, s in summaries.items():
        row = {"Editor": name}
        for head, key in (
            ("Efficacy", "efficacy"),
            ("Generalization", "generalization"),
            ("Specificity", "specificity"),
        ):
            row[head] = format_ci(s, key)
        if with_n:
            row["n"] = s.get("n_records", 0)
        recs.append(row)
    df = pd.DataFrame(recs).set_index("Editor")
    df.attrs["ci_method"] = sorted({s.get("ci_method") for s in summaries.values()})
    return df
