"""Scale-out (pmet.distributed): two gloo processes under torchrun give the same value vectors and the same
summary as one process, on a tiny model with temporary caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmet.distributed import shard_batches

SUMMARY_EXTRA = {"edit_seconds", "eval_seconds", "timings", "values_cached", "world_size", "device", "torch"}


def test_shard_batches_cover_and_recut():
    for n, b, k in [(10, 3, 2), (8, 2, 2), (1, 4, 3), (17, 4, 3), (0, 2, 2)]:
        shards = [shard_batches(n, b, r, k) for r in range(k)]
        flat = sorted(i for s in shards for batch in s for i in batch)
        assert flat == list(range(n))
        one = [list(range(s, min(s + b, n))) for s in range(0, n, b)]
        for s in shards:  # a rank's records re-cut by the batch size are the single process's batches
            mine = [i for batch in s for i in batch]
            assert [mine[j : j + b] for j in range(0, len(mine), b)] == s and all(x in one for x in s)


def _run(cache: Path, nproc: int) -> None:
    env = {
        **os.environ,
        "PMET_CACHE_DIR": str(cache),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    args = [
        "run",
        "--model",
        "tiny-llama",
        "--artifact",
        "table1",
        "--methods",
        "none",
        "pmet",
        "--n-edits",
        "7",
        "--no-generation",
        "--set",
        "v_batch_size=2",
        "--eval-batch-size",
        "3",
    ]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pmet"]
        if nproc > 1
        else [sys.executable, "-m", "pmet"]
    )
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _summaries(cache: Path) -> dict:
    out = {}
    for p in sorted((cache / "runs").rglob("summary.json")):
        out[p.parent.relative_to(cache / "runs").as_posix()] = json.loads(p.read_text())
    return out


def _values(cache: Path) -> dict:
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in (cache / "values").rglob("*.safetensors")}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, 1)
    _run(two, 2)
    s1, s2 = _summaries(one), _summaries(two)
    assert sorted(s1) == sorted(s2) and len(s1) == 2  # none and pmet, in the same run folders
    for key in s1:
        assert s2[key]["world_size"] == 2
        a = {k: v for k, v in s1[key].items() if k not in SUMMARY_EXTRA}
        b = {k: v for k, v in s2[key].items() if k not in SUMMARY_EXTRA}
        assert a == b, key
    v1, v2 = _values(one), _values(two)
    assert sorted(v1) == sorted(v2) and len(v1) == 7  # one cached value entry per request
    for name in v1:
        assert v1[name].keys() == v2[name].keys()
        for site in v1[name]:
            assert torch.equal(v1[name][site], v2[name][site]), (name, site)
    for key in s1:  # the per-record files merged into records.jsonl, in records order
        rows1 = [json.loads(x) for x in (one / "runs" / key / "records.jsonl").read_text().splitlines()[1:]]
        rows2 = [json.loads(x) for x in (two / "runs" / key / "records.jsonl").read_text().splitlines()[1:]]
        strip = lambda rows: [{k: v for k, v in r.items() if k != "eval_seconds"} for r in rows]  # noqa: E731
        assert strip(rows1) == strip(rows2)
        assert not list((two / "runs" / key).glob("records.rank*"))
    diags = [p.read_text() for c in (one, two) for p in (c / "runs").rglob("value_diagnostics.json")]
    assert len(diags) == 2 and diags[0] == diags[1]  # kept by the sharded run too, the same numbers
