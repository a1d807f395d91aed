"""Reliability: corrupt data files are named, caches are verified on load, killed runs resume exactly.

The fault test kills a run (SIGKILL, in a subprocess) while it optimises value vectors (after the first
entry of a two-request batch is saved, before the second) and while it evaluates (after the first record),
resumes it on the same cache, and compares with an uninterrupted run on another cache: value vectors,
per-record results and the summary must agree bit for bit (float32 on the CPU). The subprocess pauses at
the kill point (a wrapper around the cache write), so the kill lands there on a loaded machine too.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pmet.data as D
from pmet.tensor_cache import load_entry, save_entry


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- data files
PAYLOAD = json.dumps([{"known_id": i, "subject": f"S{i}"} for i in range(50)]).encode()


@pytest.fixture
def known_file(tmp_path, monkeypatch):
    """A registered data file ``x/facts.json`` (sha256 and size recorded) in a temporary data folder."""
    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "_VERIFIED", {})
    url = "https://example.org/facts.json"
    monkeypatch.setitem(
        D.KNOWN_FILES, "x/facts.json", D.RemoteFile(url, hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))
    )
    path = tmp_path / "data" / "x" / "facts.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    return path


def test_truncated_data_file_error_names_it(known_file):
    known_file.write_bytes(PAYLOAD[:100])  # cut mid-record: another size, so no checksum; the parse fails
    with pytest.raises(D.DataIntegrityError) as info:
        D._read_json(D.ensure_file("x/facts.json", known_file.parents[1]))
    msg = str(info.value)
    assert str(known_file) in msg and "'x/facts.json'" in msg
    assert f"{len(PAYLOAD):,} bytes" in msg and D.KNOWN_FILES["x/facts.json"].sha256 in msg  # what was expected
    assert "https://example.org/facts.json" in msg and "JSONDecodeError" in msg  # how to fix, what failed
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_same_size_corrupt_data_file_fails_its_checksum(known_file):
    known_file.write_bytes(PAYLOAD.replace(b"S1", b"S7", 1))  # valid JSON, same size, other bytes
    with pytest.raises(D.DataIntegrityError, match="is corrupt: expected") as info:
        D.ensure_file("x/facts.json", known_file.parents[1])
    assert str(known_file) in str(info.value) and "https://example.org/facts.json" in str(info.value)


def test_other_size_file_of_a_known_name_is_not_rejected(known_file):
    """A small fixture with a real file's name (tests/fixtures/data) parses; only its size differs."""
    known_file.write_text(json.dumps([{"known_id": 0, "subject": "S0"}]))
    assert D._read_json(D.ensure_file("x/facts.json", known_file.parents[1]))[0]["subject"] == "S0"


def test_unknown_json_file_parse_error_names_it(tmp_path):
    bad = tmp_path / "mine.json"
    bad.write_text('{"a": [1, 2')
    with pytest.raises(D.DataIntegrityError, match="mine.json") as info:
        D.read_json(bad)
    assert "not valid JSON" in str(info.value)


def test_checksum_is_verified_once_per_file(known_file, monkeypatch):
    calls = []
    real = D.sha256_file
    monkeypatch.setattr(D, "sha256_file", lambda p: calls.append(p) or real(p))
    base = known_file.parents[1]
    D.ensure_file("x/facts.json", base)
    D.ensure_file("x/facts.json", base)
    assert len(calls) == 1  # remembered in this process
    D._VERIFIED.clear()  # a new process: remembered in verified_data.json under the cache dir
    D.ensure_file("x/facts.json", base)
    assert len(calls) == 1
    record = json.loads((Path(os.environ["PMET_CACHE_DIR"]) / D.VERIFIED_FILE).read_text())
    assert record[str(known_file.resolve())]["size"] == len(PAYLOAD)
    st = known_file.stat()
    os.utime(known_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: checked again
    D.ensure_file("x/facts.json", base)
    assert len(calls) == 2


def test_request_error_names_index_and_subject_without_case_id():
    from pmet.editing.editor import normalize_requests

    good = {"prompt": "The capital of {} is", "subject": "Italy", "target_new": "Rome"}
    with pytest.raises(D.InvalidRecordError) as info:
        normalize_requests([good, {**good, "subject": "France", "prompt": "no placeholder"}])
    msg = str(info.value)
    assert "?" not in msg.split(":")[0] and "#1" in msg and "'France'" in msg


# ------------------------------------------------------------------------------------------ model cache
def test_gguf_content_key_ignores_location_and_mtime(tmp_path, monkeypatch):
    import pmet.models as M
    from pmet.models import _cache_is_current, _legacy_stamp, gguf_content_key

    monkeypatch.setattr(M, "GGUF_HEAD_BYTES", 1024)  # a small stand-in for the 8 MiB header and 1 MiB tail
    monkeypatch.setattr(M, "GGUF_TAIL_BYTES", 256)
    body = os.urandom(4096)
    a, b = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(body)
    os.utime(b, (1, 1))
    assert gguf_content_key(a) == gguf_content_key(b)  # a new .venv's copy maps to the same cache
    tail = bytearray(body)
    tail[-5] ^= 1
    b.write_bytes(bytes(tail))
    assert gguf_content_key(a) != gguf_content_key(b)
    head = bytearray(body)
    head[10] ^= 1
    b.write_bytes(bytes(head))
    assert gguf_content_key(a) != gguf_content_key(b)

    cached = tmp_path / "cache"
    cached.mkdir()
    assert not _cache_is_current(cached, a, gguf_content_key(a))
    (cached / "pmet_stamp.txt").write_text(_legacy_stamp(a))  # a cache made before content keys: kept
    assert _cache_is_current(cached, a, gguf_content_key(a))
    (cached / "pmet_stamp.txt").write_text("0-0")
    assert _cache_is_current(cached, a, gguf_content_key(a))  # it got its content key
    assert not _cache_is_current(cached, b, gguf_content_key(b))


# ---------------------------------------------------------------------------------------- tensor cache
def _rewrite_tensors(path: Path, change) -> None:
    """Change an entry's tensors in place, keeping its metadata (as a bad disk or a stray write would)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({n: change(t) for n, t in load_file(str(path)).items()}, str(path), metadata=meta)


def test_cache_entry_with_changed_tensors_is_a_miss(tmp_path):
    path = tmp_path / "e.safetensors"
    save_entry(path, {"v": torch.arange(4.0)}, "k", {"x": 1})
    assert load_entry(path, "k")[1] == {"x": 1}
    _rewrite_tensors(path, torch.zeros_like)
    with pytest.warns(UserWarning, match=f"{path}.*checksum"):
        assert load_entry(path, "k") is None


def test_cache_entry_without_checksum_is_still_used(tmp_path):
    """Entries written before checksums existed keep working (their keys are unchanged)."""
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"v": torch.ones(3)}, str(path), metadata={"key": "k", "info": "{}"})
    tensors, _ = load_entry(path, "k")
    assert torch.equal(tensors["v"], torch.ones(3))


def test_zeroed_value_entry_is_detected_and_recomputed(tiny_models, tmp_cache):
    from pmet.editing import edit

    model, tok = tiny_models["tiny-llama"]
    reqs = [
        {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "Paris"},
        {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "basketball"},
    ]

    def run(**kw):
        result = edit(model, tok, reqs, method="pmet", cache_dir=tmp_cache, progress=False, **kw)
        weights = {n: model.get_parameter(n).detach().clone() for n in result.deltas}
        result.restore()
        return weights

    uncached = run(use_value_cache=False)
    first = run()
    entries = sorted((tmp_cache / "values").rglob("*.safetensors"))
    assert len(entries) == 2
    _rewrite_tensors(entries[0], torch.zeros_like)  # finite, but wrong
    with pytest.warns(UserWarning, match=f"{entries[0]}.*checksum"):
        again = run()
    for n in uncached:
        assert torch.equal(first[n], uncached[n]) and torch.equal(again[n], uncached[n])
    assert load_entry(entries[0], _entry_key(entries[0])) is not None  # rewritten with the right values


def _entry_key(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["key"]


# ------------------------------------------------------------------------------- SIGKILL and resume
N_EDITS, EVAL_BATCH = 4, 1
OVERRIDES = {"v_batch_size": 2, "v_num_grad_steps": 10}  # two short value batches: a kill can land between
RUN = f"""
import sys, time
import torch
torch.set_num_threads(1)
import pmet.editing.values as V
import pmet.evaluation.results as R
from pmet import load_model
from pmet.experiments import run_edit_eval
from pmet.runspec import RunSpec

def pause_after_first(fn):  # hold the process at the point to kill it at, so the kill never races the run
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        time.sleep(600)
        return out
    return wrapped

if sys.argv[1] == "values":  # after the first value entry of the first batch is saved, before its batch-mate
    V.save_entry = pause_after_first(V.save_entry)
else:  # after the first evaluated record is appended to records.jsonl
    R.ResultsFile.append = pause_after_first(R.ResultsFile.append)
model, tok = load_model("tiny-llama")
run_edit_eval(model, tok, RunSpec("tiny-llama", "pmet", n_edits={N_EDITS}, overrides={OVERRIDES!r}),
              eval_batch_size={EVAL_BATCH}, progress=False)
"""


def _run(model, tok, cache: Path) -> dict:
    from pmet.experiments import run_edit_eval
    from pmet.runspec import RunSpec

    os.environ["PMET_CACHE_DIR"] = str(cache)
    spec = RunSpec("tiny-llama", "pmet", n_edits=N_EDITS, overrides=OVERRIDES)
    return run_edit_eval(model, tok, spec, eval_batch_size=EVAL_BATCH, progress=False)  # caches and runs under
    # $PMET_CACHE_DIR, as in the subprocess


def _run_folder(cache: Path) -> Path:
    return next((cache / "runs" / "tiny-llama" / "counterfact" / "pmet").glob(f"n{N_EDITS}_*"))


def _values(cache: Path) -> dict:
    from safetensors.torch import load_file

    return {p.name: load_file(str(p)) for p in (cache / "values").rglob("*.safetensors")}


def _rows(cache: Path) -> dict:
    lines = (_run_folder(cache) / "records.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines if "_meta" not in x]
    return {r["case_id"]: {k: v for k, v in r.items() if k != "eval_seconds"} for r in rows}


def _comparable(summary: dict) -> dict:
    # how long it took, and how many value vectors came from the cache, depend on the interruption
    return {k: v for k, v in summary.items() if k not in ("edit_seconds", "eval_seconds", "timings", "values_cached")}


def _start_and_kill(runs: dict) -> None:
    """Start the run in one subprocess per cache of ``runs`` ``{cache: (stage, ready)}`` (at once, so their
    start-up overlaps) and SIGKILL each as soon as its ``ready()`` holds (the run pauses there, see RUN)."""
    procs = {}
    for cache, (stage, _) in runs.items():
        env = {**os.environ, "PMET_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
        procs[cache] = subprocess.Popen(
            [sys.executable, "-c", RUN, stage], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    deadline = time.monotonic() + 300
    try:
        while any(p.returncode is None for p in procs.values()):
            for cache, proc in procs.items():
                if proc.returncode is not None:
                    continue
                if runs[cache][1]():
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                elif proc.poll() is not None:
                    pytest.fail(
                        f"the run on {cache.name} ended (rc={proc.returncode}) before it could be killed: "
                        f"{proc.stderr.read().decode()[-2000:]}"
                    )
            assert time.monotonic() < deadline, "a run never reached the point to kill it at"
            time.sleep(0.01)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()


def test_sigkilled_runs_resume_to_the_uninterrupted_result(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path))  # restored after the test (_run sets it per cache)
    from pmet import load_model

    model, tok = load_model("tiny-llama")  # a fresh copy, as the subprocesses load (no other test's leftovers)
    during_values, during_eval = tmp_path / "killed_in_values", tmp_path / "killed_in_eval"

    def values_started():
        return len(list((during_values / "values").rglob("*.safetensors"))) >= 1

    def eval_started():
        runs = list((during_eval / "runs").rglob("records.jsonl"))
        return bool(runs) and runs[0].read_text().count("\n") >= 2  # the meta line and a first record

    _start_and_kill({during_values: ("values", values_started), during_eval: ("eval", eval_started)})
    assert len(_values(during_values)) == 1  # killed between the two entries of the first value batch
    assert (_run_folder(during_eval) / "edited_weights.safetensors").exists()
    assert len(_rows(during_eval)) == 1 and not (_run_folder(during_eval) / "summary.json").exists()

    reference = _run(model, tok, tmp_path / "uninterrupted")
    for cache in (during_values, during_eval):
        resumed = _run(model, tok, cache)
        assert _comparable(resumed) == _comparable(reference)
        assert _rows(cache) == _rows(tmp_path / "uninterrupted")
        ref_values = _values(tmp_path / "uninterrupted")
        got = _values(cache)
        assert got.keys() == ref_values.keys()
        for name, tensors in got.items():
            assert all(torch.equal(t, ref_values[name][n]) for n, t in tensors.items()), name
