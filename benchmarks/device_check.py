"""The GPU path in one short run: does an edit on the accelerator agree with the CPU's, and how fast is it?

    python -m benchmarks.device_check --out benchmarks/results          # a CUDA machine: ~3-5 min
    python -m benchmarks.device_check --device cpu --quick              # the script itself, anywhere (~1 min)

Nothing here needs the hub: the models are the tiny ones built in code and the embedded smollm2 (GGUF), the data
the shared data folder or, where it is absent (a fresh clone, a device machine), the committed test fixtures.

1. **Agreement** (float32): the same PMET and MEMIT edits made on the CPU and on ``--device``, for tiny-llama,
   tiny-gptj and smollm2 (smollm2 only without ``--quick``): the largest relative difference of the written
   Δ per weight, and whether every request's rewrite succeeds on both (efficacy: P(new) > P(true)). GPU
   kernels round differently, so the deltas differ in their last bits; the edit outcomes should not.
2. **Speed** on ``--device`` (smollm2): PMET's and MEMIT's value vectors per request (float32 and bf16 with
   ``v_fast``; fresh value cache) and CounterFact evaluation records per second, without and with generation.
   Ratios against this repository's CPU figures (``benchmarks/results/summary.json``) say what a GPU buys.

Prints a table and writes ``device_check_<device kind>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data"


def _data_dir() -> None:
    """Use the shared data where it is found, else the committed fixtures (a device machine has no shared/)."""
    from pmet.paths import data_dir

    try:
        (data_dir() / "counterfact" / "counterfact_subset_merged.json").stat()
    except OSError:
        os.environ["PMET_DATA_DIR"] = str(FIXTURES)


def _records(n: int) -> list:
    from pmet.experiments import table_records

    return table_records("counterfact", n)


def _cache(root: Path, name: str) -> Path:
    """A fresh cache folder (value vectors of its own) whose key statistics are the user's cache's
    (``$PMET_CACHE_DIR/stats``): they depend on the model and corpus only, so each is computed once, ever."""
    from pmet.paths import cache_dir

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    stats = cache_dir() / "stats"
    stats.mkdir(parents=True, exist_ok=True)
    if not (folder / "stats").exists():
        os.symlink(stats, folder / "stats")
    return folder


def _edit(name: str, device: str, method: str, records, overrides: dict, cache: Path):
    """Δ per weight (on the CPU) and per-request rewrite success of one edit of ``records`` on ``device``."""
    from benchmarks.values_speed import rewrite_outcomes
    from pmet.editing import edit
    from pmet.models import load_model

    model, tok = load_model(name, device=device)
    res = edit(
        model, tok, [r.as_request() for r in records], method=method, hparams=overrides, cache_dir=cache, progress=False
    )
    try:
        deltas = {k: d.detach().float().cpu() for k, d in res.deltas.items()}
        outcomes = [o["success"] for o in rewrite_outcomes(model, tok, records)]
    finally:
        res.restore()
    return deltas, outcomes


def agreement(name: str, device: str, method: str, n: int, overrides: dict, root: Path) -> dict:
    """The same edit on the CPU and on ``device`` (separate value caches, shared key statistics)."""
    records = _records(n)
    d_cpu, ok_cpu = _edit(name, "cpu", method, records, overrides, _cache(root, f"{name}-{method}-cpu"))
    d_dev, ok_dev = _edit(name, device, method, records, overrides, _cache(root, f"{name}-{method}-dev"))
    rel = max(float((d_dev[k] - d_cpu[k]).norm() / d_cpu[k].norm().clamp_min(1e-12)) for k in d_cpu)
    return {
        "model": name,
        "method": method,
        "n_edits": n,
        "max_rel_delta_diff": rel,
        "success_cpu": sum(ok_cpu),
        "success_device": sum(ok_dev),
        "same_outcomes": ok_cpu == ok_dev,
    }


def speed(device: str, n_values: int, n_eval: int, root: Path) -> dict:
    """smollm2 on ``device``: value vectors per request (fresh cache) and evaluation records per second."""
    import torch

    from pmet.editing import edit
    from pmet.evaluation import evaluate_counterfact
    from pmet.models import load_model

    model, tok = load_model("smollm2", device=device)
    records = _records(max(n_values, n_eval))
    out = {}
    for method in ("pmet", "memit"):
        for label, over in (("float32", {}), ("bf16 fast", {"v_autocast": "bfloat16", "v_fast": True})):
            cache = _cache(root, f"smollm2-{method}-{label.replace(' ', '-')}")
            res = edit(
                model,
                tok,
                [r.as_request() for r in records[:n_values]],
                method=method,
                hparams=over,
                cache_dir=cache,
                progress=False,
            )
            res.restore()
            vt = res.timings.get("values", float("nan"))
            out[f"{method} values {label} s/request"] = round(vt / n_values, 4)
            out[f"{method} edit total {label} s"] = round(res.timings.get("total", float("nan")), 2)
    for generation in (False, True):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        evaluate_counterfact(model, tok, records[:n_eval], generation=generation, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[f"eval {'with' if generation else 'without'} generation rec/s"] = round(
            n_eval / (time.perf_counter() - t), 3
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.device_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny models and a few requests only (checks the script)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--n-values", type=int, default=64, help="requests timed per editor and precision (smollm2)")
    p.add_argument("--n-eval", type=int, default=50, help="records timed per evaluation mode (smollm2)")
    a = p.parse_args(argv)

    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("device_check: no CUDA device here; use --device cpu to check the script itself")
        return 2
    _data_dir()
    kind = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    root = Path(tempfile.mkdtemp(prefix="pmet-device-check-"))
    t0 = time.perf_counter()
    small = {"v_num_grad_steps": 5, "mom2_n_tokens": 2000}
    checks = [
        agreement(m, a.device, meth, 4, small, root) for m in ("tiny-llama", "tiny-gptj") for meth in ("pmet", "memit")
    ]
    if not a.quick:
        checks += [
            agreement("smollm2", a.device, meth, 8, {"mom2_n_tokens": 20_000}, root) for meth in ("pmet", "memit")
        ]
    rates = {} if a.quick else speed(a.device, a.n_values, a.n_eval, root)
    res = {
        "device": a.device,
        "device_name": kind,
        "torch": torch.__version__,
        "quick": a.quick,
        "time": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": round(time.perf_counter() - t0, 1),
        "agreement": checks,
        "speed_smollm2": rates,
    }
    print(f"{'model':10s} {'method':6s} {'n':>3s} {'max rel |ΔΔ|':>13s} {'success cpu/dev':>15s} same")
    for c in checks:
        print(
            f"{c['model']:10s} {c['method']:6s} {c['n_edits']:3d} {c['max_rel_delta_diff']:13.2e} "
            f"{c['success_cpu']:7d}/{c['success_device']:<7d} {c['same_outcomes']}"
        )
    for k, v in rates.items():
        print(f"{k:45s} {v}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "".join(ch if ch.isalnum() else "_" for ch in kind.lower()).strip("_")
    path = out / f"device_check_{name}{'_quick' if a.quick else ''}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
