"""Evaluation speed, before vs after issue 20, interleaved in one run (ratios are what counts here).

    python -m benchmarks.eval_ab --threads 2            # defaults: 100 / 100 / 400 records

On the same records and model (the unedited ``smollm2`` by default) it runs, chunk by chunk and in a
rotating order so that a change in machine load hits every variant alike:

* CounterFact without generation: ``impl="legacy"`` (budget-filled padded batches) vs ``impl="fast"``
  (length-bucketed batches), checking that every per-record value agrees (max |Δ NLL| and the number of
  records whose efficacy/generalization/specificity differ);
* zsRE: the same two;
* CounterFact with generation (ROME's protocol: 10 prompts per record, 100 tokens, top-k 5, seeded):
  ``legacy`` (64 prompts per decode step, growing cache) vs ``fast`` (128 prompts per step, static cache,
  float32) vs ``fast`` with ``gen_dtype="bfloat16"``; fluency and the consistency proxy of each with their
  95% CIs side by side, and how many generated texts are identical to the legacy ones.

Prints a table and merges its keys into ``benchmarks/results/summary.json`` (other keys there are kept);
the full output goes to ``benchmarks/results/eval_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _chunks(xs, n):
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def _interleaved(variants: dict, chunks: list, run) -> tuple[dict, dict]:
    """Run every variant on every chunk, rotating the order per chunk; (seconds, rows) per variant."""
    names = list(variants)
    secs = {k: 0.0 for k in names}
    rows = {k: [] for k in names}
    for c_i, chunk in enumerate(chunks):
        order = names[c_i % len(names) :] + names[: c_i % len(names)]
        for k in order:
            t = time.perf_counter()
            rows[k].extend(run(chunk, **variants[k]))
            secs[k] += time.perf_counter() - t
    return secs, rows


def _max_nll_diff_cf(a: dict, b: dict) -> float:
    d = 0.0
    for g in ("rewrite", "paraphrase", "neighborhood"):
        for x, y in zip(a[g], b[g]):
            d = max(d, abs(x["target_new"] - y["target_new"]), abs(x["target_true"] - y["target_true"]))
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-cf", type=int, default=100, help="CounterFact records without generation")
    p.add_argument("--n-zsre", type=int, default=400)
    p.add_argument("--n-gen", type=int, default=100, help="CounterFact records with generation")
    p.add_argument("--chunk-gen", type=int, default=25, help="records per interleaved chunk with generation")
    p.add_argument("--chunk-cf", type=int, default=50, help="records per interleaved chunk without generation")
    p.add_argument("--chunk-zsre", type=int, default=200, help="zsRE records per interleaved chunk")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 generation variant")
    p.add_argument("--summary", default=str(RESULTS / "summary.json"))
    a = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from pmet import load_model
    from pmet.data import load_counterfact, load_zsre
    from pmet.evaluation import ConsistencyScorer, evaluate_counterfact, evaluate_zsre, summarize_counterfact

    model, tok = load_model(a.model)
    res: dict = {
        "model": a.model,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    try:
        res["machine"] = (
            next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
            + f", {a.threads} threads"
        )
    except (OSError, StopIteration):
        pass
    from pmet.evaluation.scoring import DEFAULT_MIN_BATCH_TOKENS

    out: dict = {"min_batch_tokens": DEFAULT_MIN_BATCH_TOKENS}

    # ---- CounterFact without generation ------------------------------------------------------------
    cf = load_counterfact("full", limit=max(a.n_cf, a.n_gen))
    evaluate_counterfact(model, tok, cf[:2], generation=False, progress=False)  # warm-up
    variants = {"legacy": {"impl": "legacy"}, "fast": {"impl": "fast"}}
    secs, rows = _interleaved(
        variants,
        _chunks(cf[: a.n_cf], a.chunk_cf),
        lambda ch, **kw: evaluate_counterfact(model, tok, ch, generation=False, progress=False, **kw),
    )
    out["cf"] = {k: a.n_cf / v for k, v in secs.items()}
    mets = ("efficacy", "generalization", "specificity", "efficacy_acc", "generalization_acc", "specificity_acc")
    out["cf_max_abs_nll_diff"] = max(_max_nll_diff_cf(x, y) for x, y in zip(rows["legacy"], rows["fast"]))
    pairs = list(zip(rows["legacy"], rows["fast"]))
    out["cf_records_metric_differs"] = sum(any(x[m] != y[m] for m in mets) for x, y in pairs)
    out["cf_records_bit_identical"] = sum(_max_nll_diff_cf(x, y) == 0.0 for x, y in pairs)

    # ---- zsRE --------------------------------------------------------------------------------------
    zs = load_zsre("eval", limit=a.n_zsre)
    secs, rows = _interleaved(
        variants, _chunks(zs, a.chunk_zsre), lambda ch, **kw: evaluate_zsre(model, tok, ch, progress=False, **kw)
    )
    out["zsre"] = {k: len(zs) / v for k, v in secs.items()}
    keys = ("rewrite_nll", "paraphrase_nll", "neighborhood_nll")
    out["zsre_max_abs_nll_diff"] = max(abs(x[k] - y[k]) for x, y in zip(rows["legacy"], rows["fast"]) for k in keys)
    zmets = ("efficacy", "generalization", "specificity")
    out["zsre_records_metric_differs"] = sum(
        any(x[m] != y[m] for m in zmets) for x, y in zip(rows["legacy"], rows["fast"])
    )

    # ---- CounterFact with generation ---------------------------------------------------------------
    scorer = ConsistencyScorer()
    gvars = {"legacy": {"impl": "legacy"}, "fast": {"impl": "fast"}}
    if not a.no_bf16:
        gvars["fast_bf16"] = {"impl": "fast", "gen_dtype": "bfloat16"}
    gen_recs = cf[: a.n_gen]
    secs, rows = _interleaved(
        gvars,
        _chunks(gen_recs, a.chunk_gen),
        lambda ch, **kw: evaluate_counterfact(
            model, tok, ch, generation=True, progress=False, consistency=scorer, batch_size=len(ch), **kw
        ),
    )
    out["gen"] = {k: len(gen_recs) / v for k, v in secs.items()}
    out["gen_summary"] = {}
    for k in gvars:
        s = summarize_counterfact(rows[k])
        metric = "consistency" if "consistency" in s else "consistency_proxy"
        out["gen_summary"][k] = {m: (s[m], s[f"{m}_ci"]) for m in ("fluency", metric)}
    out["gen_texts_identical_to_legacy"] = {
        k: sum(t1 == t2 for x, y in zip(rows["legacy"], rows[k]) for t1, t2 in zip(x["generated"], y["generated"]))
        for k in gvars
        if k != "legacy"
    }
    out["gen_texts"] = sum(len(x["generated"]) for x in rows["legacy"])

    def overlap(c1, c2):
        return bool(c1[0] <= c2[1] and c2[0] <= c1[1])

    out["gen_cis_overlap"] = {
        k: all(
            overlap(out["gen_summary"]["legacy"][m][1], out["gen_summary"][k][m][1])
            for m in out["gen_summary"]["legacy"]
        )
        for k in gvars
        if k != "legacy"
    }

    # ---- report ------------------------------------------------------------------------------------
    res["eval_ab"] = out
    lines = [
        f"Evaluation A/B ({res['machine']}, {a.model}; records/s, interleaved in one run)",
        f"{'stage':<34}{'before':>10}{'after':>10}{'ratio':>8}  records",
    ]
    lines.append(
        f"{'CounterFact, no generation':<34}{out['cf']['legacy']:>10.2f}{out['cf']['fast']:>10.2f}"
        f"{out['cf']['fast'] / out['cf']['legacy']:>7.2f}x  {a.n_cf}"
    )
    lines.append(
        f"{'zsRE':<34}{out['zsre']['legacy']:>10.2f}{out['zsre']['fast']:>10.2f}"
        f"{out['zsre']['fast'] / out['zsre']['legacy']:>7.2f}x  {len(zs)}"
    )
    for k in gvars:
        if k == "legacy":
            continue
        lines.append(
            f"{'CounterFact + generation, ' + k:<34}{out['gen']['legacy']:>10.3f}{out['gen'][k]:>10.3f}"
            f"{out['gen'][k] / out['gen']['legacy']:>7.2f}x  {len(gen_recs)}"
        )
    lines.append(
        f"teacher-forced values, fast vs legacy: CounterFact max |dNLL| {out['cf_max_abs_nll_diff']:.2e} "
        f"({out['cf_records_bit_identical']}/{a.n_cf} records bit-identical, "
        f"{out['cf_records_metric_differs']} with a different metric); zsRE max |dNLL| "
        f"{out['zsre_max_abs_nll_diff']:.2e} ({out['zsre_records_metric_differs']} with a different metric)"
    )
    lines.append(f"generation on {len(gen_recs)} records (x100, 95% CI of summarize_counterfact's default rule):")
    for k, s in out["gen_summary"].items():
        lines.append("  " + f"{k:<10}" + "  ".join(f"{m} {v:.1f} [{c[0]:.1f}, {c[1]:.1f}]" for m, (v, c) in s.items()))
    lines.append(
        f"  texts identical to legacy: {out['gen_texts_identical_to_legacy']} of {out['gen_texts']}; "
        f"CIs overlap legacy: {out['gen_cis_overlap']}"
    )
    print("\n".join(lines))
    res["table"] = lines

    keys = {
        "eval_cf_gen_records_per_s_fast": out["gen"]["fast"],
        "eval_cf_gen_records_per_s_before": out["gen"]["legacy"],
        "eval_cf_records_per_s": out["cf"]["fast"],
        "eval_cf_records_per_s_before": out["cf"]["legacy"],
        "eval_zsre_records_per_s": out["zsre"]["fast"],
        "eval_zsre_records_per_s_before": out["zsre"]["legacy"],
        "threads": res["threads"],
        "machine": res["machine"],
    }
    if "fast_bf16" in out["gen"]:
        keys["eval_cf_gen_records_per_s_fast_bf16"] = out["gen"]["fast_bf16"]
    summary_path = Path(a.summary)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update(keys)
    summary.update(_table1_estimate(summary))
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1))
    (summary_path.parent / "eval_ab.json").write_text(json.dumps(res, indent=1, default=float))
    del np
    return 0


def _table1_estimate(summary: dict) -> dict:
    """The Table-1-at-1,590 estimate of :func:`benchmarks.values_speed.table1_estimate` again with this run's
    evaluation rates, when the value benchmark's figures are in the summary (else nothing); also with bf16
    sampling (``..._bf16_generation``), the explicit faster generation option."""
    from benchmarks.values_speed import table1_estimate

    per = {m: summary.get(f"values_{m}_s_per_request_fast") for m in ("pmet", "memit")}
    if None in per.values():
        return {}
    fixed = 3600 * summary.get("table1_estimate_parts_hours", {}).get("once_only", 0.0)
    out = table1_estimate(per, summary, fixed)
    if summary.get("eval_cf_gen_records_per_s_fast_bf16"):
        bf16 = table1_estimate(
            per, {"eval_cf_gen_records_per_s_fast": summary["eval_cf_gen_records_per_s_fast_bf16"]}, fixed
        )
        out["table1_1590_all_editors_hours_estimate_bf16_generation"] = bf16["table1_1590_all_editors_hours_estimate"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
