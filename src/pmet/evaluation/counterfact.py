"""CounterFact evaluation (ROME/MEMIT definitions; PMET Appendix B).

Per record (MEMIT ``compute_rewrite_quality_counterfact`` + ``summarize.py``), with ``nll`` the mean
per-token NLL of ``" " + target`` after the prompt (see :mod:`pmet.evaluation.scoring`):

* ``efficacy``       = mean over the rewrite prompt(s) of ``[nll_new < nll_true]`` (MEMIT ``rewrite_success``;
                       a tie counts as failure, as MEMIT's strict ``>``);
* ``generalization`` = the same over the paraphrase prompts;
* ``specificity``    = mean over neighborhood prompts of ``[nll_true < nll_new]``;
* ``*_diff``         = mean of ``exp(-nll_new) - exp(-nll_true)`` (neighborhood: the reverse), MEMIT's
                       magnitude metrics;
* ``*_acc``          = MEMIT's accuracy metrics: all tokens of the expected target (new for rewrite and
                       paraphrase, true for neighborhood) are the argmax predictions;
* ``fluency``        = ROME's n-gram entropy of the texts generated from the generation prompts;
* ``consistency`` or ``consistency_proxy`` = TF-IDF cosine with reference texts
  (:mod:`pmet.evaluation.generation` explains the proxy).

Records with only the reduced (EasyEdit/MEND) fields get efficacy, generalization and specificity from
their one paraphrase and one neighborhood prompt (the neighborhood's expected answer is its
``neighborhood_target``, which equals ``target_true`` in all 21,919 reduced records) and no generation
metrics; generation runs only for full-field records. Per-record values are fractions in [0, 1] (fluency
in bits); :func:`summarize_counterfact` averages over records and reports percent (fluency and
consistency x100, as MEMIT's summarize.py and the paper's tables) with a CI and the number of records
each mean rests on. ``score`` is the harmonic mean of the efficacy, generalization and specificity means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import nn

from .generation import ConsistencyScorer, generate_fast, n_gram_entropy, word_tokenizer_name
from .results import ResultsFile, evaluate_resumable
from .scoring import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MIN_BATCH_TOKENS,
    _pad_id,
    prompt_ids,
    score_id_pairs,
    target_ids,
)
from .stats import ci_by_rule, format_ci, harmonic_mean, score_ci

__all__ = ["evaluate_counterfact", "summarize_counterfact", "counterfact_table", "CF_METRICS", "EVAL_IMPLS"]

METRIC_VERSION = 1
CF_METRICS = [
    "efficacy",
    "generalization",
    "specificity",
    "efficacy_diff",
    "generalization_diff",
    "specificity_diff",
    "efficacy_acc",
    "generalization_acc",
    "specificity_acc",
    "fluency",
    "consistency",
    "consistency_proxy",
]
EVAL_IMPLS = ("fast", "legacy")  # "legacy": the batching and generation before issue 20 (A/B benchmarks)
_GROUPS = (("rewrite", "efficacy", 0), ("paraphrase", "generalization", 0), ("neighborhood", "specificity", 1))


def _prompt_groups(rec) -> dict[str, list[str]]:
    return {
        "rewrite": [rec.prompt.format(rec.subject)],
        "paraphrase": list(rec.paraphrase_prompts),
        "neighborhood": list(rec.neighborhood_prompts),
    }


def _record_metrics(rec, scores: dict[str, list[tuple]]) -> dict:
    """``scores[group]`` = list of (PairScore new, PairScore true) per prompt."""
    row: dict = {"case_id": rec.case_id, "schema": rec.schema}
    for group, metric, correct_is in _GROUPS:
        pairs = scores[group]
        row[group] = [{"target_new": a.nll, "target_true": b.nll} for a, b in pairs]
        if not pairs:
            row[metric] = row[f"{metric}_diff"] = row[f"{metric}_acc"] = None
            row[f"{group}_correct"] = []
            continue
        if correct_is == 0:  # new should win
            succ = [a.nll < b.nll for a, b in pairs]
            diff = [math.exp(-a.nll) - math.exp(-b.nll) for a, b in pairs]
            corr = [a.all_correct for a, b in pairs]
        else:  # true should win
            succ = [b.nll < a.nll for a, b in pairs]
            diff = [math.exp(-b.nll) - math.exp(-a.nll) for a, b in pairs]
            corr = [b.all_correct for a, b in pairs]
        row[metric] = float(np.mean(succ))
        row[f"{metric}_diff"] = float(np.mean(diff))
        row[f"{metric}_acc"] = float(np.mean(corr))
        row[f"{group}_correct"] = corr
    return row


def _score_records(
    model, tok, records, fast, max_batch_tokens, min_batch_tokens: int | None = DEFAULT_MIN_BATCH_TOKENS
) -> list[dict]:
    """Teacher-forced scores of both targets for every prompt of every record, in one batched call."""
    pairs, where = [], []
    for r_i, rec in enumerate(records):
        new_ids = target_ids(tok, rec.target_new)
        true_nb = rec.neighborhood_target or rec.target_true
        for group, prompts in _prompt_groups(rec).items():
            true_ids = target_ids(tok, true_nb if group == "neighborhood" else rec.target_true)
            for p in prompts:
                p_ids = prompt_ids(tok, p)
                pairs.append((p_ids, new_ids))
                pairs.append((p_ids, true_ids))
                where.append((r_i, group))
    scores = score_id_pairs(
        model,
        pairs,
        pad_id=_pad_id(tok),
        fast=fast,
        max_batch_tokens=max_batch_tokens,
        min_batch_tokens=min_batch_tokens,
    )
    per: list[dict[str, list]] = [{g: [] for g, _, _ in _GROUPS} for _ in records]
    for k, (r_i, group) in enumerate(where):
        per[r_i][group].append((scores[2 * k], scores[2 * k + 1]))
    return [_record_metrics(rec, s) for rec, s in zip(records, per)]


def evaluate_counterfact(
    model: nn.Module,
    tok,
    records: Sequence,
    batch_size: int = 64,
    generation: bool = True,
    out_path=None,
    progress: bool = True,
    *,
    seed: int = 0,
    max_out_len: int = 100,
    top_k: int = 5,
    gen_batch_size: int | None = None,
    consistency: ConsistencyScorer | None = None,
    keep_texts: bool = True,
    fast: bool | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    meta: dict | None = None,
    impl: str = "fast",
    gen_dtype: str | None = None,
) -> list[dict]:
    """Evaluate ``model`` on CounterFact records; one result dict per record, in ``records`` order.

    ``batch_size`` records are scored (and, with ``generation``, generated for) together; with
    ``out_path`` each batch's rows are appended to a JSON Lines file and records already there are
    skipped (resume). ``meta`` (e.g. ``{"model": ..., "editor": ...}``) is stored in and checked against
    the file. Generation metrics are computed for full-field records only; ``consistency`` is built
    once (:class:`ConsistencyScorer`) when not given.

    Speed (issue 20): the ``batch_size`` records' prompts are scored in length-bucketed batches and
    their generation prompts decoded ``gen_batch_size`` (default 128) at a time into a static KV cache.
    ``impl="legacy"`` runs the code before issue 20 (budget-filled padded batches; generation 64 prompts
    at a time with a growing cache), kept for A/B benchmarks; teacher-forced values agree up to float
    rounding and generation draws the same seeded uniforms. ``gen_dtype="bfloat16"`` samples from a bf16
    copy of the model (faster on CPUs with bf16 units, different logits; stored in the file's meta).
    """
    if impl not in EVAL_IMPLS:
        raise ValueError(f"impl must be one of {EVAL_IMPLS}, got {impl!r}")
    legacy = impl == "legacy"
    if gen_batch_size is None:
        gen_batch_size = 64 if legacy else 128
    min_tokens = None if legacy else DEFAULT_MIN_BATCH_TOKENS
    file_meta = {
        "dataset": "counterfact",
        "generation": bool(generation),
        "metric_version": METRIC_VERSION,
        **(meta or {}),
    }
    if generation:
        file_meta.update(seed=seed, max_out_len=max_out_len, top_k=top_k)
        if gen_dtype is not None:
            file_meta["gen_dtype"] = str(gen_dtype)
    store = ResultsFile(out_path, file_meta) if out_path is not None else None
    done = store.done_ids() if store is not None else set()
    if (
        generation
        and consistency is None
        and any(r.full_fields and r.generation_prompts for r in records if r.case_id not in done)
    ):
        consistency = ConsistencyScorer()

    def score_batch(chunk):
        rows = _score_records(model, tok, chunk, fast, max_batch_tokens, min_tokens)
        if generation:
            gen_recs = [(i, r) for i, r in enumerate(chunk) if r.full_fields and r.generation_prompts]
            prompts = [p for _, r in gen_recs for p in r.generation_prompts]
            keys = [(r.case_id, j) for _, r in gen_recs for j in range(len(r.generation_prompts))]
            texts = (
                generate_fast(
                    model,
                    tok,
                    prompts,
                    keys=keys,
                    max_out_len=max_out_len,
                    top_k=top_k,
                    seed=seed,
                    batch_size=gen_batch_size,
                    fast=fast,
                    impl="legacy" if legacy else "static",
                    dtype=gen_dtype,
                )
                if prompts
                else []
            )
            k = 0
            for i, r in gen_recs:
                t = texts[k : k + len(r.generation_prompts)]
                k += len(r.generation_prompts)
                rows[i]["fluency"] = n_gram_entropy(t)
                rows[i].update(consistency.score(r, t))
                if keep_texts:
                    rows[i]["generated"] = t
        return rows

    return evaluate_resumable(records, score_batch, batch_size, store, "CounterFact eval", progress)


def _metric_values(rows, name):
    return [r.get(name) for r in rows if r.get(name) is not None]


def summarize_counterfact(
    rows: Sequence[dict], ci: str = "auto", confidence: float = 0.95, seed: int = 0, n_resamples: int = 9999
) -> dict:
    """Means over records (percent; fluency x100 like MEMIT), ``<m>_ci`` = (low, high), ``<m>_n`` = #records,
    ``<m>_ci_method`` = how the interval was made.

    ``ci="auto"`` (default): the interval suited to each metric's per-record values
    (:func:`pmet.evaluation.stats.metric_ci`): Wilson for 0/1 outcomes (efficacy: one rewrite prompt per
    record), a seeded percentile bootstrap over records for per-record means over several prompts
    (generalization, specificity), fluency and consistency. ``"normal"``/``"bootstrap"``: the older
    normal-approximation / BCa intervals for every metric. ``score`` = harmonic mean of the efficacy,
    generalization and specificity means with a bootstrap interval over the records that have all three
    (:func:`pmet.evaluation.stats.score_ci`; with ``ci="normal"`` none).
    """
    rows = [r for r in rows if r is not None]
    out: dict = {"dataset": "counterfact", "n_records": len(rows), "ci_method": ci, "confidence": confidence}
    for m in CF_METRICS:
        vals = _metric_values(rows, m)
        if not vals:
            continue
        c = ci_by_rule(vals, ci, confidence, seed, n_resamples).scaled(100.0)
        out[m], out[f"{m}_ci"], out[f"{m}_n"], out[f"{m}_ci_method"] = c.mean, (c.low, c.high), c.n, c.method
    parts = ["efficacy", "generalization", "specificity"]
    if all(p in out for p in parts):
        out["score"] = harmonic_mean([out[p] for p in parts])
        both = [r for r in rows if all(r.get(p) is not None for p in parts)]
        out["score_n"] = len(both)
        out["score_ci"] = None
        if ci != "normal" and both:
            c = score_ci([[r[p] for p in parts] for r in both], confidence, seed, n_resamples).scaled(100.0)
            out["score_ci"], out["score_ci_method"] = (c.low, c.high), c.method
    sources = [r.get("consistency_source") for r in rows if r.get("consistency_source")]
    if sources:
        out["consistency_sources"] = {s: sources.count(s) for s in sorted(set(sources))}
        out["word_tokenizer"] = word_tokenizer_name()
    return out


def counterfact_table(summaries: dict, with_n: bool = True):
    """pandas DataFrame, one row per named summary, columns as in the paper's Table 1.

    The consistency column is headed "Consistency (proxy)" when any summary has the proxy metric.
    """
    import pandas as pd

    proxy = any("consistency_proxy" in s for s in summaries.values())
    cols = [
        ("Score", "score"),
        ("Efficacy", "efficacy"),
        ("Generalization", "generalization"),
        ("Specificity", "specificity"),
        ("Fluency", "fluency"),
        ("Consistency (proxy)" if proxy else "Consistency", "consistency_proxy" if proxy else "consistency"),
    ]
    recs = []
    for name, s in summaries.items():
        row = {"Editor": name}
        for head, key in cols:
            row[head] = format_ci(s, key)
        if with_n:
            row["n (eff/gen/spec/flu/cons)"] = "/".join(
                str(s.get(f"{k}_n", 0))
                for k in (
                    "efficacy",
                    "generalization",
                    "specificity",
                    "fluency",
                    "consistency_proxy" if proxy else "consistency",
                )
            )
        recs.append(row)
    df = pd.DataFrame(recs).set_index("Editor")
    df.attrs["ci_method"] = sorted({s.get("ci_method") for s in summaries.values()})
    return df
