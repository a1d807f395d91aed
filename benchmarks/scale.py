"""Memory and time of the Eq. 9 update at the paper's scale: C0 and the solve for a 6-layer, 10,000-edit run.

    python -m benchmarks.scale --out benchmarks/results/scale.json

For each model shape (the real ``d_in`` = FFN width and ``d_out`` = hidden size of smollm2, gemma3-270m and
GPT-J) one *fresh subprocess* holds the six layers' ``C0`` (float32, as ``pmet.stats`` stores them) and
the keys ``K1`` and residuals ``R`` of ``n`` requests for the layer being edited, then calls
:func:`pmet.editing.core.solve_update` (float64, as the editors do) layer after layer. Its peak resident
memory (``ru_maxrss``, the whole process: Python, torch, the tensors) and the time per layer are
reported. The tensors are random (a well-conditioned ``C0 = E[kk^T]`` from random keys): the cost of the
solve does not depend on the values. ``--solve-layers`` bounds how many of the six solves are timed (GPT-J's
16,384-wide solve takes minutes each on 2 cores; every layer costs the same).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# name: (d_in = FFN width, the key dimension; d_out = hidden size, the value dimension)
SHAPES = {"smollm2": (1536, 576), "gemma3-270m": (2048, 640), "gptj": (16384, 4096)}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def one(name: str, n: int, n_layers: int, solve_layers: int, threads: int | None) -> dict:
    """Runs inside its own process so that ``ru_maxrss`` is this configuration's peak."""
    import torch

    from pmet.editing.core import solve_update

    if threads:
        torch.set_num_threads(threads)
    d_in, d_out = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    base = peak_gib()
    t0 = time.perf_counter()
    C0 = []
    for _ in range(n_layers):  # every critical layer's statistics resident at once (worst case)
        k = torch.randn(d_in, d_in // 4 + 64, generator=g)
        C0.append((k @ k.T / k.shape[1]).float())
    t_c0 = time.perf_counter() - t0
    after_c0 = peak_gib()
    K1 = torch.randn(d_in, n, generator=g)
    R = torch.randn(d_out, n, generator=g)
    per_layer = []
    for layer in range(min(solve_layers, n_layers)):
        t0 = time.perf_counter()
        delta = solve_update(R / n_layers, K1, C0[layer], lam=15_000.0)
        per_layer.append(time.perf_counter() - t0)
        del delta
    return {
        "model_shape": name,
        "d_in": d_in,
        "d_out": d_out,
        "n_requests": n,
        "n_layers": n_layers,
        "c0_resident_gib": n_layers * d_in * d_in * 4 / 2**30,
        "c0_build_s": round(t_c0, 2),
        "rss_before_gib": round(base, 3),
        "rss_after_c0_gib": round(after_c0, 3),
        "peak_rss_gib": round(peak_gib(), 3),
        "solve_s_per_layer": [round(t, 2) for t in per_layer],
        "solve_s_6_layers_est": round(n_layers * sum(per_layer) / max(1, len(per_layer)), 1),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--n", type=int, default=10_000, help="edit requests")
    p.add_argument("--layers", type=int, default=6, help="critical layers (GPT-J: 3..8)")
    p.add_argument("--solve-layers", type=int, default=None, help="solves to time (default: all; gptj: 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(one(a.child, a.n, a.layers, a.solve_layers or a.layers, a.threads)))
        return 0
    rows = []
    for name in a.models:
        solve_layers = a.solve_layers or (1 if name == "gptj" else a.layers)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.scale",
            "--child",
            name,
            "--n",
            str(a.n),
            "--layers",
            str(a.layers),
            "--solve-layers",
            str(solve_layers),
        ]
        cmd += ["--threads", str(a.threads)] if a.threads else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{name:12s} d_in {r['d_in']:6d}  C0 x{a.layers} {r['c0_resident_gib']:6.2f} GiB  "
            f"peak RSS {r['peak_rss_gib']:6.2f} GiB  solve {r['solve_s_per_layer'][0]:7.1f} s/layer "
            f"(~{r['solve_s_6_layers_est']:.0f} s for {a.layers})",
            flush=True,
        )
    res = {
        "n_requests": a.n,
        "n_layers": a.layers,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
        "fits_24_gib": all(r["peak_rss_gib"] < 24 for r in rows),
    }
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
