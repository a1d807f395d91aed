"""Evaluation throughput (records/s) and peak memory on smollm2; also the unedited model's table rows.

    python benchmarks/eval_speed.py --n 50                      # quick: 50 records each
    python benchmarks/eval_speed.py --n-cf 500 --n-gen 100 --n-zsre 1037 --out results/unedited

CounterFact records are the full-field ones (split "full"), zsRE the 1,037 eval records. Peak memory is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the whole process, model included). With ``--out`` the
per-record results go to JSON Lines files there (an interrupted run resumes; timings then only cover the
records evaluated in this run) and the summaries to ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def _maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=50, help="default for --n-cf, --n-gen and --n-zsre")
    ap.add_argument("--n-cf", type=int, default=None, help="CounterFact records without generation")
    ap.add_argument("--n-gen", type=int, default=None, help="CounterFact records with generation (0: skip)")
    ap.add_argument("--n-zsre", type=int, default=None, help="zsRE eval records")
    ap.add_argument("--batch-size", type=int, default=64, help="records per scoring batch")
    ap.add_argument(
        "--gen-batch-size",
        type=int,
        default=None,
        help="prompts per generation decode step (default: evaluate_counterfact's, 128)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--ci", default="normal", choices=["normal", "bootstrap"])
    ap.add_argument("--out", default=None, help="folder for per-record JSON Lines and summary.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pmet import load_model
    from pmet.data import load_counterfact, load_zsre
    from pmet.evaluation import (
        ConsistencyScorer,
        counterfact_table,
        evaluate_counterfact,
        evaluate_zsre,
        summarize_counterfact,
        summarize_zsre,
        zsre_table,
    )

    n_cf = args.n if args.n_cf is None else args.n_cf
    n_gen = args.n if args.n_gen is None else args.n_gen
    n_zsre = args.n if args.n_zsre is None else args.n_zsre
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(
        f"model {args.model} loaded in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}; "
        f"RSS {_maxrss_mib():.0f} MiB"
    )
    meta = {"model": args.model, "editor": "unedited"}
    progress = not args.no_progress
    timings, summaries = {}, {}

    def timed(label, n, fn):
        t = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t
        timings[label] = {
            "records": n,
            "seconds": dt,
            "records_per_s": n / dt if dt > 0 else float("nan"),
            "peak_rss_mib": _maxrss_mib(),
        }
        print(
            f"{label}: {n} records in {dt:.1f} s = {n / dt:.2f} records/s; peak RSS {_maxrss_mib():.0f} MiB", flush=True
        )
        return res

    if n_cf:
        recs = load_counterfact("full", limit=n_cf)
        rows = timed(
            "counterfact (no generation)",
            len(recs),
            lambda: evaluate_counterfact(
                model,
                tok,
                recs,
                batch_size=args.batch_size,
                generation=False,
                progress=progress,
                out_path=out / "counterfact_nogen.jsonl" if out else None,
                meta=meta,
            ),
        )
        summaries["counterfact"] = summarize_counterfact(rows, ci=args.ci)
    if n_gen:
        recs = load_counterfact("full", limit=n_gen)
        t = time.perf_counter()
        scorer = ConsistencyScorer()
        print(f"consistency: {scorer.description} ({time.perf_counter() - t:.1f} s to build)")
        rows = timed(
            "counterfact (with generation)",
            len(recs),
            lambda: evaluate_counterfact(
                model,
                tok,
                recs,
                batch_size=min(args.batch_size, 32),
                generation=True,
                progress=progress,
                consistency=scorer,
                gen_batch_size=args.gen_batch_size,
                out_path=out / "counterfact_gen.jsonl" if out else None,
                meta=meta,
            ),
        )
        summaries["counterfact_gen"] = summarize_counterfact(rows, ci=args.ci)
    if n_zsre:
        recs = load_zsre("eval", limit=n_zsre)
        rows = timed(
            "zsre",
            len(recs),
            lambda: evaluate_zsre(
                model,
                tok,
                recs,
                batch_size=max(args.batch_size, 128),
                progress=progress,
                out_path=out / "zsre.jsonl" if out else None,
                meta=meta,
            ),
        )
        summaries["zsre"] = summarize_zsre(rows, ci=args.ci)

    import pandas as pd

    pd.set_option("display.width", 200)
    cf = {k: v for k, v in summaries.items() if k.startswith("counterfact")}
    if cf:
        names = {"counterfact": f"{args.model} (n={n_cf}, no gen)", "counterfact_gen": f"{args.model} (n={n_gen}, gen)"}
        print(f"\nCounterFact, unedited; 95% CI half-widths ({args.ci}) in parentheses; percent, fluency x100")
        print(counterfact_table({names[k]: v for k, v in cf.items()}).to_string())
    if "zsre" in summaries:
        print(f"\nzsRE, unedited; 95% CI half-widths ({args.ci}); percent")
        print(zsre_table({f"{args.model} (n={n_zsre})": summaries["zsre"]}).to_string())
    print("\nThroughput:")
    for k, v in timings.items():
        print(f"  {k:32s} {v['records_per_s']:8.2f} records/s  ({v['records']} in {v['seconds']:.1f} s)")
    print(f"peak RSS {_maxrss_mib():.0f} MiB")
    if out:
        (out / "summary.json").write_text(
            json.dumps(
                {"summaries": summaries, "timings": timings, "threads": torch.get_num_threads()}, indent=1, default=str
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
