"""Is bf16 faster than float32 on this CPU? One value-optimisation-sized matrix product, timed in both.

    python -m benchmarks.bf16_gemm --threads 2

The bf16 options (``value_autocast="bfloat16"`` for value vectors, bf16 sampling) pay off only on CPUs whose
oneDNN has bf16 matrix kernels (AVX-512 BF16 or AMX); elsewhere PyTorch multiplies bf16 matrices with its
reference kernel. This times ``y = x @ w`` and its backward (``x``: [rows, d], ``w``: [d, ff] with smollm2's
d = 576, ff = 1,536, the FFN products of Eq. 10's optimisation) in float32 and in bf16, prints the
milliseconds and the ratio, and records the CPU's capability and what
:func:`pmet.models.fast_low_precision` says (the check behind the library's ``SlowPrecisionWarning``).

Writes ``benchmarks/results/bf16_gemm.json`` (one entry per CPU capability seen, so runs on different
machines sit side by side) and merges ``bf16_gemm_ratio_<capability>`` into ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def time_product(dtype, rows: int, d: int, ff: int, reps: int) -> dict:
    """Median milliseconds of the forward product and of forward + backward in ``dtype``."""
    import statistics

    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(d, ff, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn(rows, ff, generator=g).to(dtype)
    (x @ w).backward(grad)  # warm-up
    fwd, both = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = x @ w
        t1 = time.perf_counter()
        y.backward(grad)
        t2 = time.perf_counter()
        fwd.append(1e3 * (t1 - t0))
        both.append(1e3 * (t2 - t0))
    return {"forward_ms": statistics.median(fwd), "forward_backward_ms": statistics.median(both)}


def main(argv=None) -> dict:
    import torch

    from benchmarks.values_speed import merge_summary
    from pmet.models import fast_low_precision

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=512, help="rows of x (requests x prompts x tokens)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "bf16_gemm.json"))
    p.add_argument("--summary", default=str(RESULTS / "summary.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    res = {
        "cpu_capability": capability,
        "threads": a.threads,
        "shape": {"rows": a.rows, "d": 576, "ff": 1536},
        "torch": torch.__version__,
        "fast_low_precision_bf16": fast_low_precision("cpu", torch.bfloat16),
    }
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        res[name] = time_product(dtype, a.rows, 576, 1536, a.reps)
    res["bf16_over_float32"] = res["bfloat16"]["forward_backward_ms"] / res["float32"]["forward_backward_ms"]
    print(
        f"{capability}, {a.threads} threads, x[{a.rows}, 576] @ w[576, 1536], forward + backward: "
        f"float32 {res['float32']['forward_backward_ms']:.1f} ms, bf16 {res['bfloat16']['forward_backward_ms']:.1f} ms "
        f"({res['bf16_over_float32']:.2f}x float32's time); fast_low_precision(bf16) = {res['fast_low_precision_bf16']}"
    )
    out = Path(a.out)
    seen = json.loads(out.read_text()) if out.exists() else {}
    seen[capability] = res
    out.write_text(json.dumps(seen, indent=1, sort_keys=True) + "\n")
    merge_summary(Path(a.summary), {f"bf16_gemm_ratio_{capability}": round(res["bf16_over_float32"], 3)})
    return res


if __name__ == "__main__":
    main()
