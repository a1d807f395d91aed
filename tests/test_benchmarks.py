"""Smoke test of the benchmark script on a tiny model (it measures; this only checks that it runs and
reports every figure the README quotes)."""

import json
import math

from benchmarks import run


def test_benchmark_runs_and_reports_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "cache"))  # the script points it at a fresh folder
    out = tmp_path / "bench.json"
    assert (
        run.main(
            [
                "--model",
                "tiny-llama",
                "--n",
                "2",
                "--n-single",
                "1",
                "--stats-tokens",
                "600",
                "--eval-records",
                "2",
                "--gen-records",
                "1",
                "--rome-edits",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    for key in (
        "stats_vs_forward",
        "values_batched_req_per_h",
        "values_single_req_per_h",
        "values_speedup",
        "values_batched_bfloat16_req_per_h",
        "solve_seconds_per_layer",
        "eval_counterfact_rec_per_s",
        "eval_counterfact_generation_rec_per_s",
        "eval_zsre_rec_per_s",
        "end_to_end_seconds",
        "extrapolated_1000_edit_hours",
        "extrapolated_10000_edit_hours",
        "end_to_end_peak_mib",
        "rome_float32_seconds_per_edit",
        "rome_bfloat16_seconds_per_edit",
        "rome_bfloat16_delta_rel_diff",
    ):
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert res["extrapolated_10000_edit_hours"] > res["extrapolated_1000_edit_hours"]
    assert res["end_to_end_autocast"] == "bfloat16"


def test_device_check_runs_its_agreement_part_on_the_cpu(tmp_path, monkeypatch):
    """``benchmarks.device_check --device cpu --quick``: the GPU check's agreement part, CPU against CPU on the
    tiny models, must find the same deltas and outcomes (so a difference on a GPU is the GPU's); without CUDA,
    asking for it is a clear exit, not a traceback."""
    from benchmarks import device_check

    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "cache"))
    assert device_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "device_check_cpu_quick.json").read_text())
    assert len(res["agreement"]) == 4 and res["speed_smollm2"] == {}
    for check in res["agreement"]:
        assert check["max_rel_delta_diff"] == 0.0 and check["same_outcomes"], check
    import torch

    if not torch.cuda.is_available():
        assert device_check.main(["--device", "cuda", "--quick", "--out", str(tmp_path)]) == 2
