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


def test_a_committed_run_is_read_instead_of_run_and_only_when_it_is_that_run(
    tiny_models, tmp_cache, tmp_path, monkeypatch
):
    """``committed=``: a run whose committed per-record file (same path, same identity, every record) exists is
    read into the empty cache -- nothing edited or evaluated -- and the notebooks write the same file from it;
    another run, or a file that is not exactly that run, is run as before."""
    import pmet.editing
    import pmet.evaluation
    from pmet.diagnostics import FIELD, read_run_diagnostics
    from pmet.experiments import run_edit_eval
    from pmet.notebook import Notebook
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-llama"]
    spec = RunSpec("tiny-llama", "pmet", n_edits=3, overrides=(("v_num_grad_steps", 5),))
    summary = run_edit_eval(model, tok, spec, progress=False)
    repo = tmp_path / "repo"
    (path,) = Notebook("t", {"out_dir": str(repo)}).save_runs({"tiny-llama": {"pmet": summary}})
    committed = path.read_bytes()

    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "fresh"))  # a fresh machine: nothing cached
    monkeypatch.setattr(pmet.editing, "edit", lambda *a, **k: pytest.fail("edited again"))
    monkeypatch.setattr(pmet.evaluation, "evaluate_counterfact", lambda *a, **k: pytest.fail("evaluated again"))
    again = run_edit_eval(model, tok, spec, progress=False, committed=repo)
    assert again == read_run(path).summary
    folder = next((tmp_path / "fresh" / "runs").rglob("summary.json")).parent
    assert len(read_run_diagnostics(folder)) == 3 and all(FIELD in r for r in read_run(path).rows)
    (path2,) = Notebook("t", {"out_dir": str(tmp_path / "b")}).save_runs({"tiny-llama": {"pmet": again}})
    assert path2.read_bytes() == committed  # the committed file, written again from the cache it filled

    other = spec.replace(overrides=(("v_num_grad_steps", 4),))  # another run: not in the repository
    with pytest.raises(pytest.fail.Exception, match="edited again"):
        run_edit_eval(model, tok, other, progress=False, committed=repo)
    # the file at the run's path but not that run (one record short; another seed): run, not read
    stored = read_run(path)
    for bad in ({"rows": stored.rows[:2]}, {"spec": {**stored.spec, "seed": 1}}):
        write_run(path, bad.get("spec", stored.spec), stored.summary, bad.get("rows", stored.rows))
        monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / f"fresh{len(bad)}{'spec' in bad}"))
        with pytest.raises(pytest.fail.Exception, match="edited again"):
            run_edit_eval(model, tok, spec, progress=False, committed=repo)


def test_the_committed_run_wins_over_a_cached_one_that_differs(tiny_models, tmp_cache, tmp_path, capsys):
    """With ``committed=`` a finished cached run that reports other results than the committed file (another
    CPU's last bits) is replaced by the committed run, with a stage line; one with the same results is kept."""
    from pmet.experiments import run_edit_eval, same_results
    from pmet.notebook import Notebook
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-llama"]
    spec = RunSpec("tiny-llama", "none", n_edits=3)
    cached = run_edit_eval(model, tok, spec, progress=False)
    repo = tmp_path / "repo"
    (path,) = Notebook("t", {"out_dir": str(repo)}).save_runs({"tiny-llama": {"none": cached}})
    assert same_results(cached, read_run(path).summary)
    assert same_results(run_edit_eval(model, tok, spec, committed=repo), cached)
    assert "the same as the committed run" in capsys.readouterr().err

    stored = read_run(path)  # the committed file as another machine made it: one record's outcome differs
    rows = [dict(stored.rows[0], efficacy=1.0 - stored.rows[0]["efficacy"]), *stored.rows[1:]]
    other = {**stored.summary, "efficacy": stored.summary["efficacy"] + 1.0, "eval_seconds": 1.0}
    write_run(path, stored.spec, other, rows)
    assert not same_results(cached, other) and same_results(other, {**other, "eval_seconds": 9.0})
    assert run_edit_eval(model, tok, spec, committed=repo) == other
    assert "differs from the committed one" in capsys.readouterr().err
    assert run_edit_eval(model, tok, spec) == other  # the cache now holds the committed run
    (again,) = Notebook("t", {"out_dir": str(tmp_path / "b")}).save_runs({"tiny-llama": {"none": other}})
    assert read_run(again).rows == rows


def test_the_extended_pool_runs_beyond_the_full_field_records(tiny_models, tmp_cache):
    """``pool="extended"``: every full-field record first (the subset run's order, so a smaller run is a prefix
    and its values are shared), then reduced ``counterfact-edit`` records; their run folder is apart (``_ext``),
    generation metrics come from the full-field records only, and a size within the subset is the subset run."""
    from pmet.data import load_counterfact
    from pmet.experiments import run_edit_eval, spec_records, table_records
    from pmet.runcache import run_folder
    from pmet.runspec import RunSpec

    subset = table_records("counterfact")
    spec = RunSpec("tiny-llama", "none", n_edits=len(subset) + 3, generation=True, pool="extended")
    records, pool = spec_records(spec)
    assert pool == "extended" and records[: len(subset)] == subset
    edit_ids = {r.case_id for r in load_counterfact("edit")}
    assert all(not r.full_fields and r.case_id in edit_ids for r in records[len(subset) :])
    assert spec_records(spec.replace(n_edits=4)) == (subset[:4], "subset")

    model, tok = tiny_models["tiny-llama"]
    summary = run_edit_eval(model, tok, spec, progress=False)
    assert summary["efficacy_n"] == summary["specificity_n"] == len(subset) + 3
    assert summary["fluency_n"] == len(subset) and summary["spec"]["pool"] == "extended"
    assert run_folder(RunSpec.from_dict(summary["spec"]), summary["hparams"]).name.endswith("_gen_ext")
    small = run_edit_eval(model, tok, spec.replace(n_edits=4, generation=False), progress=False)
    assert small["spec"]["pool"] == "subset"  # the same run as the subset's: one folder, one file
    with pytest.raises(ValueError, match="pool must be"):
        RunSpec("tiny-llama", "none", pool="reduced")
    with pytest.raises(ValueError, match="CounterFact's"):
        RunSpec("tiny-llama", "none", "zsre", pool="extended")


def test_a_sweep_reads_its_committed_points(tiny_models, tmp_path, monkeypatch):
    """``run_sweep(..., committed=)``: each committed point is read, not run; for ROME (one trajectory for all
    points) a missing point still runs, and a point read from its file is the same as the one it ran."""
    import pmet.editing
    from pmet.experiments import run_sweep
    from pmet.notebook import Notebook
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-gptj"]
    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "first"))
    specs = {m: RunSpec("tiny-gptj", m, overrides=(("v_num_grad_steps", 3),)) for m in ("rome", "memit")}
    swept = {}
    for m, spec in specs.items():
        swept.update({(n, m): s for n, s in run_sweep(model, tok, spec, [1, 2], progress=False).items()})
    repo = tmp_path / "repo"
    paths = Notebook("t", {"out_dir": str(repo)}).save_runs(swept)
    assert len(paths) == 4

    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "fresh"))  # a fresh machine: nothing cached
    real_edit = pmet.editing.edit
    monkeypatch.setattr(pmet.editing, "edit", lambda *a, **k: pytest.fail("edited again"))
    for m, spec in specs.items():
        again = run_sweep(model, tok, spec, [1, 2], progress=False, committed=repo)
        assert again == {n: read_run(p).summary for p in paths for n in (1, 2) if f"{m}_n{n}_" in p.name}

    # ROME with only its first point committed: the trajectory runs to 2 (edits), point 1 comes from the file
    next(p for p in paths if "rome_n2_" in p.name).unlink()
    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "fresh2"))
    calls = []
    monkeypatch.setattr(pmet.editing, "edit", lambda *a, **k: calls.append(len(a[2])) or real_edit(*a, **k))
    again = run_sweep(model, tok, specs["rome"], [1, 2], progress=False, committed=repo)
    assert calls == [2] and again[1] == read_run(next(p for p in paths if "rome_n1_" in p.name)).summary
    for key in ("efficacy", "generalization", "specificity"):
        assert again[2][key] == swept[(2, "rome")][key]
