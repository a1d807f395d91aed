"""Where the time of Eq. 10's value optimisation goes: a torch.profiler table of one batch.

    python -m benchmarks.profile_values --model smollm2 --n 4 --out benchmarks/results/profile_values.txt

Optimises the values of ``n`` CounterFact requests at PMET's last critical layer (no value cache) under
``torch.profiler`` and prints the operators by self CPU time, plus the share of matrix products
(``aten::mm/bmm/addmm/linear`` and attention) in the total. ``--autocast bfloat16`` profiles the same batch
under bf16 autocast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_values",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="gradient steps (no early stop)")
    p.add_argument("--autocast", default=None, choices=[None, "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    if a.threads:
        torch.set_num_threads(a.threads)
    from dataclasses import replace

    from pmet.editing import load_hparams, normalize_requests
    from pmet.editing.context import flatten, get_context_templates
    from pmet.editing.values import compute_values
    from pmet.experiments import table_records
    from pmet.models import load_model

    model, tok = load_model(a.model)
    hp = load_hparams("pmet", model, "counterfact")
    # a fixed number of steps (no early stop) so runs compare; loss_stop/kl_stop can never trigger
    hp = replace(hp, v_num_grad_steps=a.steps, loss_stop=-1.0, kl_stop=-1.0, v_batch_size=a.n, v_autocast=a.autocast)
    L = max(hp.layers or model.layout.critical_layers)
    reqs = normalize_requests([r.as_request() for r in table_records("counterfact", a.n, seed=5)], tok)
    templates, _ = flatten(
        get_context_templates(model, tok, hp.context_length, hp.context_n_per_start, hp.context_seed)
    )
    compute_values(
        model, tok, reqs[:1], replace(hp, v_num_grad_steps=2), templates, L, use_cache=False, progress=False
    )  # warm-up
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        compute_values(model, tok, reqs, hp, templates, L, use_cache=False, progress=False)
    wall = time.perf_counter() - t
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(
        e.self_cpu_time_total
        for e in events
        if any(k in e.key for k in ("mm", "linear", "matmul", "attention", "_mkldnn"))
    )
    table = events.table(sort_by="self_cpu_time_total", row_limit=a.rows)
    head = (
        f"model {a.model}, {a.n} requests x {len(templates)} context prompts, {a.steps} steps, layer L={L}, "
        f"autocast {a.autocast}, {torch.get_num_threads()} threads: {wall:.1f} s wall under the profiler; "
        f"matrix products and attention {100 * matmul / total:.0f}% of self CPU time"
    )
    print(head)
    print(table)
    if a.out:
        Path(a.out).write_text(head + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
