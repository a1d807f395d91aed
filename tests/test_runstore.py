import gzip

import pytest

from pmet.runstore import iter_runs, read_run, write_run


def test_round_trip_and_bytes_reproducible(tmp_path):
    spec = {"model": "tiny", "dataset": "counterfact", "method": "pmet", "n_edits": 2, "seed": 0}
    summary = {"efficacy": 50.0}
    rows = [{"case_id": 3, "efficacy": 1.0}, {"case_id": 7, "efficacy": 0.0}]
    p = write_run(tmp_path / "a" / "run1.jsonl.gz", spec, summary, rows)
    run = read_run(p)
    assert run.spec == spec and run.summary == summary and run.rows == rows
    assert run.by_case()[7]["efficacy"] == 0.0
    first = p.read_bytes()
    write_run(p, spec, summary, rows)
    assert p.read_bytes() == first
    write_run(tmp_path / "b" / "run2.jsonl.gz", {**spec, "method": "memit"}, summary, rows)
    assert [r.spec["method"] for r in iter_runs(tmp_path)] == ["pmet", "memit"]
    assert [r.spec["method"] for r in iter_runs(tmp_path, method="memit")] == ["memit"]


def test_damaged_file_named(tmp_path):
    p = tmp_path / "bad.jsonl.gz"
    p.write_bytes(gzip.compress(b"{not json\n"))
    with pytest.raises(ValueError, match="bad.jsonl.gz"):
        read_run(p)
    with pytest.raises(ValueError, match="end with"):
        write_run(tmp_path / "x.json", {}, {}, [])
