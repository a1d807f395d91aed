"""Hyperparameter search on ``counterfact-val`` only (never on the records the tables use).

``grid_search`` edits the same ``n`` validation requests once per configuration (all at once, as a mass
edit), evaluates efficacy / generalization / specificity on them and appends one CSV row per
configuration, so an interrupted search resumes and the record of the search lives next to the
hyperparameter files (``src/pmet/editing/hparams/tuning_<method>_<model>.csv``).

    python -m pmet.tuning --model smollm2 --method pmet --n 10 \\
        --grid '{"v_lr": [0.2, 0.5], "clamp_norm_factor": [0.75, 2.0]}'
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from pathlib import Path


def grid_search(
    model,
    tok,
    method: str,
    grid: dict,
    n: int = 10,
    seed: int = 0,
    out_csv: str | Path | None = None,
    base: dict | None = None,
    progress: bool = False,
) -> list[dict]:
    """One row per configuration of ``grid`` (a dict of lists, product taken) on ``n`` val requests."""
    import random

    from .data import load_counterfact
    from .editing import edit, hparams_for
    from .editing.hparams import HPARAMS_DIR
    from .evaluation import evaluate_counterfact, summarize_counterfact

    pool = load_counterfact("val")
    random.Random(seed).shuffle(pool)
    records = pool[:n]
    name = getattr(model, "pmet_name", "model")
    out_csv = Path(out_csv) if out_csv else HPARAMS_DIR / f"tuning_{method}_{name}.csv"
    done = set()
    if out_csv.exists():
        with open(out_csv) as f:
            done = {(r["config"], int(r["n"]), int(r["seed"])) for r in csv.DictReader(f)}
    keys = sorted(grid)
    rows = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        overrides = {**(base or {}), **dict(zip(keys, combo))}
        tag = json.dumps(overrides, sort_keys=True)
        if (tag, len(records), seed) in done:
            continue
        hp = hparams_for(method, model, "counterfact", **overrides)
        t0 = time.perf_counter()
        result = edit(model, tok, [r.as_request() for r in records], method=method, hparams=hp, progress=progress)
        try:
            summary = summarize_counterfact(evaluate_counterfact(model, tok, records, generation=False, progress=False))
        finally:
            result.restore()
        row = {
            "config": tag,
            "n": len(records),
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1),
            **{
                m: round(summary.get(m, float("nan")), 2)
                for m in ("score", "efficacy", "generalization", "specificity")
            },
        }
        rows.append(row)
        new = not out_csv.exists()
        with open(out_csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    from .models import load_model

    p = argparse.ArgumentParser(
        prog="python -m pmet.tuning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--method", default="pmet")
    p.add_argument("--n", type=int, default=10)
    p.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="one or more seeds; with --n 1 each seed is a different single edit",
    )
    p.add_argument("--grid", required=True, help="JSON dict of lists")
    p.add_argument("--base", default="{}", help="JSON dict of fixed overrides")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    for seed in a.seed:
        grid_search(model, tok, a.method, json.loads(a.grid), a.n, seed, a.out, json.loads(a.base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
