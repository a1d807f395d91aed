"""Does the fast value path change what an edit scores? float32 against bf16 + ``v_fast`` on 100 val edits.

    python -m benchmarks.fast_vs_float32 --threads 2   # took 116 min at --threads 1 beside two other jobs

Issue 20 ("Results must not change"): a fast path that changes numerics must give the same edit outcomes as
float32 on the value benchmark's requests (``benchmarks.values_speed``) *and* scores within the CIs on 100
``counterfact-val`` edits, PMET and MEMIT, printed side by side. This script edits the same 100 val records
(the tuning split: never a table record; the first 100 of its seed-0 permutation, as ``pmet.tuning``) at
once with each editor's smollm2 hyperparameters, once with float32 value vectors (the reference) and once
with ``v_autocast="bfloat16", v_fast=True``, evaluates efficacy / generalization / specificity without
generation, and prints for each editor both summaries with their 95% intervals and the paired difference
(fast - float32) with its paired bootstrap CI and test (:func:`pmet.evaluation.stats.paired_comparison`).

Writes ``benchmarks/results/fast_vs_float32.json`` and merges ``fast_scores_within_ci`` (every metric of the
fast path inside the float32 interval, for both editors) and ``fast_paired_p_min`` into ``summary.json``.
Value vectors go to a temporary cache unless ``--cache-dir`` is given (then a rerun reuses them).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"float32": {}, "fast": {"v_autocast": "bfloat16", "v_fast": True}}
METRICS = ("efficacy", "generalization", "specificity")


def val_records(n: int, seed: int = 0) -> list:
    """The first ``n`` records of the seed-``seed`` permutation of ``counterfact-val`` (as ``pmet.tuning``)."""
    from pmet.data import load_counterfact

    pool = load_counterfact("val")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def edit_and_score(model, tok, method: str, records, overrides: dict) -> tuple[list[dict], float]:
    """Per-record rows of one mass edit of ``records`` (weights restored afterwards) and its edit seconds."""
    from pmet.editing import edit, hparams_for
    from pmet.evaluation import evaluate_counterfact

    hp = hparams_for(method, model, "counterfact", **overrides)
    t0 = time.perf_counter()
    result = edit(model, tok, [r.as_request() for r in records], method=method, hparams=hp, progress=True)
    seconds = time.perf_counter() - t0
    try:
        rows = evaluate_counterfact(model, tok, records, generation=False, progress=False)
    finally:
        result.restore()
    return rows, seconds


def compare(rows_ref: list[dict], rows_fast: list[dict]) -> dict:
    """Both summaries (percent, 95% intervals) and the paired differences fast - float32 per metric."""
    import numpy as np

    from pmet.evaluation import summarize_counterfact
    from pmet.evaluation.stats import paired_comparison

    s_ref, s_fast = summarize_counterfact(rows_ref), summarize_counterfact(rows_fast)
    by_id = {r["case_id"]: r for r in rows_fast}
    pairs = [(r, by_id[r["case_id"]]) for r in rows_ref if r["case_id"] in by_id]
    out = {"n": len(pairs), "metrics": {}}
    for m in (*METRICS, "score"):
        if m == "score":
            a = np.array([[p[1][k] for k in METRICS] for p in pairs], dtype=float)
            b = np.array([[p[0][k] for k in METRICS] for p in pairs], dtype=float)
            test = paired_comparison(a, b, kind="score")
        else:
            test = paired_comparison([p[1][m] for p in pairs], [p[0][m] for p in pairs])
        lo, hi = s_ref.get(f"{m}_ci") or (float("nan"), float("nan"))
        out["metrics"][m] = {
            "float32": s_ref[m],
            "float32_ci": s_ref.get(f"{m}_ci"),
            "fast": s_fast[m],
            "fast_ci": s_fast.get(f"{m}_ci"),
            "fast_inside_float32_ci": bool(lo <= s_fast[m] <= hi),
            "diff": 100 * test["diff"],
            "diff_ci": [100 * test["diff_ci"][0], 100 * test["diff_ci"][1]],
            "pvalue": test["pvalue"],
            "test": test["test"],
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--methods", default="pmet,memit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="value/statistics cache (default: a temporary folder)")
    p.add_argument("--summary", default=str(RESULTS / "summary.json"))
    p.add_argument("--out", default=str(RESULTS / "fast_vs_float32.json"))
    a = p.parse_args(argv)

    import os

    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PMET_CACHE_DIR"] = a.cache_dir or os.environ.get("PMET_CACHE_DIR") or tmp
        from pmet.models import load_model

        model, tok = load_model(a.model)
        records = val_records(a.n)
        res: dict = {"model": a.model, "n": len(records), "threads": a.threads, "time": time.strftime("%Y-%m-%d %H:%M")}
        res["load_average_1min_start"] = round(os.getloadavg()[0], 2)
        for method in a.methods.split(","):
            rows, secs = {}, {}
            for v, overrides in VARIANTS.items():
                rows[v], secs[v] = edit_and_score(model, tok, method, records, overrides)
                print(f"{method} {v}: edit {secs[v]:.0f} s", flush=True)
            res[method] = {"edit_seconds": secs, **compare(rows["float32"], rows["fast"])}
    lines = [f"{a.model}, {res['n']} counterfact-val edits at once; fast = bf16 autocast + v_fast; 95% intervals"]
    for method in a.methods.split(","):
        lines.append(f"{method}: {'metric':<15}{'float32':>24}{'fast':>24}   fast - float32 [paired 95% CI], p")
        for m, r in res[method]["metrics"].items():
            ci = r["float32_ci"] or (float("nan"),) * 2
            fci = r["fast_ci"] or (float("nan"),) * 2
            lines.append(
                f"{'':<7}{m:<15}{r['float32']:7.1f} [{ci[0]:5.1f}, {ci[1]:5.1f}]  {r['fast']:7.1f} [{fci[0]:5.1f}, "
                f"{fci[1]:5.1f}]   {r['diff']:+5.1f} [{r['diff_ci'][0]:+5.1f}, {r['diff_ci'][1]:+5.1f}], "
                f"p = {r['pvalue']:.3f} ({r['test']})"
            )
    print("\n".join(lines))
    res["table"] = lines
    within = all(r["fast_inside_float32_ci"] for m in a.methods.split(",") for r in res[m]["metrics"].values())
    p_min = min(r["pvalue"] for m in a.methods.split(",") for r in res[m]["metrics"].values())
    Path(a.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    summary_path = Path(a.summary)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({"fast_scores_within_ci": within, "fast_paired_p_min": round(float(p_min), 4)})
    summary_path.write_text(json.dumps(summary, indent=1))
    print(f"fast inside the float32 intervals on every metric: {within}; smallest paired p = {p_min:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
