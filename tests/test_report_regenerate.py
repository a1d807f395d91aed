"""`python -m pmet report` regenerates the committed tables from the committed per-record run files (offline, no
model), and says for each table it cannot regenerate why."""

import json
import shutil

import pandas as pd
import pytest

from pmet.paths import REPO_ROOT
from pmet.runstore import iter_runs, read_run, recomputed_summary, write_run

RESULTS = REPO_ROOT / "results"
TABLES = REPO_ROOT / "tables"
TABLE1 = "table1_smollm2_bfloat16"
needs_committed_runs = pytest.mark.skipif(not any(RESULTS.rglob("*.jsonl.gz")), reason="no committed run files")


def _metrics(summary: dict) -> dict:
    keys = [k for k in summary if k.split("_")[0] in ("efficacy", "generalization", "specificity", "score")]
    return json.loads(json.dumps({k: summary[k] for k in keys}))  # tuples -> lists, as stored


@needs_committed_runs
def test_recomputed_summaries_equal_the_stored_ones_and_follow_the_records():
    """The experiments' summariser on a file's rows gives the summary stored with it (means, intervals, counts);
    a changed record changes it."""
    for run in iter_runs(RESULTS):
        assert _metrics(recomputed_summary(run)) == _metrics(run.summary), run.path
    run = read_run(next(RESULTS.rglob("pmet_n100_*.jsonl.gz")))
    run.rows[0] = {**run.rows[0], "efficacy": 1.0 - run.rows[0]["efficacy"]}
    s = recomputed_summary(run)
    assert s["efficacy"] != run.summary["efficacy"] and s["spec"] == run.summary["spec"]


def _notebook_table(out, runs):
    """Table 1 as the notebook writes it (grid_table, caption, manifest entry, summaries) from the stored
    summaries of ``runs``."""
    from pmet.notebook import Notebook
    from pmet.report import grid_sizes, grid_table, table1_caption

    grid = {"smollm2": {r.spec["method"]: r.summary for r in runs}}
    params = dict(models=["smollm2"], value_autocast="bfloat16", overrides=None, size_reason="test", default_n=1000)
    nb = Notebook(
        "table1",
        {"out_dir": str(out), "overwrite": False, "methods": list(grid["smollm2"]), "mend_steps": None, **params},
    )
    art = nb.artifact("table1", ["smollm2"], "bfloat16", 0, sizes={"smollm2": 100})
    caption = table1_caption(["smollm2"], grid_sizes(grid), "bfloat16", None, "test", 1000, None)
    assert caption.startswith("Table 1: 100 CounterFact edits on smollm2; value vectors optimised under bfloat16")
    art.save_table(grid_table(grid, "counterfact"), caption)
    art.save_summaries(grid)
    return out / "tables" / TABLE1


@needs_committed_runs
def test_regenerated_table_equals_the_notebooks_and_a_changed_record_changes_it(tmp_path, capsys):
    """A table written by the notebook's code from the committed runs comes back byte for byte from
    `pmet report --tables-only` (CSV, Markdown with caption, LaTeX); after one record of the PMET file is changed
    (its stored summary left as it was) the regenerated PMET efficacy cell follows the record."""
    from pmet.cli import main

    shutil.copytree(RESULTS, tmp_path / "results")
    runs = [  # the four runs without generation (the six with it make the committed Table 1)
        r
        for r in iter_runs(tmp_path / "results", n_edits=100, generation=False)
        if r.spec["method"] in ("none", "ft", "memit", "pmet") and not r.spec.get("overrides")  # one run per editor
    ]
    stem = _notebook_table(tmp_path, runs)
    before = {ext: stem.with_suffix(ext).read_text() for ext in (".csv", ".md", ".tex")}
    assert main(["report", "--out-dir", str(tmp_path), "--tables-only"]) == 0
    assert f"wrote tables/{TABLE1}.{{csv,md,tex,json}} from 4 per-record run files" in capsys.readouterr().out
    assert {ext: stem.with_suffix(ext).read_text() for ext in before} == before
    entry = json.loads((tmp_path / "tables" / "manifest.json").read_text())[f"{TABLE1}.csv"]
    assert entry["regenerated_by"].startswith("python -m pmet report") and len(entry["runs"]) == 4
    assert entry["config"]["sizes"] == {"smollm2": 100}  # the notebook's configuration is kept

    pmet = next(r for r in runs if r.spec["method"] == "pmet")
    rows = [dict(r) for r in pmet.rows]
    rows[0]["efficacy"] = 1.0 - rows[0]["efficacy"]
    write_run(pmet.path, pmet.spec, pmet.summary, rows)
    assert main(["report", "--out-dir", str(tmp_path), "--tables-only"]) == 0
    after = pd.read_csv(stem.with_suffix(".csv")).set_index("Editor")
    assert (
        after.loc["PMET", "Efficacy"]
        != pd.read_csv(pd.io.common.StringIO(before[".csv"])).set_index("Editor").loc["PMET", "Efficacy"]
    )
    assert after.loc["PMET", "Efficacy"].startswith("99.0 [")


def test_a_table_whose_runs_lack_files_is_named_with_the_reason(tmp_path):
    """Pure check of the matching: a recorded run without a file, one whose file differs in generation, and one
    whose file has the same identity but other results are each named; nothing is regenerated."""
    from pmet.report import regenerate_table

    spec = {"model": "m", "dataset": "counterfact", "method": "pmet", "n_edits": 2, "seed": 0, "generation": False}
    rows = [{"case_id": i, "efficacy": 1.0, "generalization": 0.5, "specificity": 0.5} for i in range(2)]
    p = write_run(tmp_path / "pmet.jsonl.gz", {**spec, "hparams_id": "h"}, {"efficacy": 100.0}, rows)
    run = read_run(p)
    old_style = {k: v for k, v in spec.items() if k != "generation"}  # a summary written before specs were recorded
    recorded = {"m": {"pmet": {**old_style, "hparams": "h", "efficacy": 100.0}}}
    entry = {"notebook": "table1", "caption": "Table 1: mean (95% CI half-width, normal approximation); x."}
    ok = regenerate_table("table1_m", entry, recorded, [run])
    assert not ok.reason and ok.caption == "Table 1: mean [95% interval]; x." and ok.frame.loc[0, "Editor"] == "PMET"
    assert ok.frame.loc[0, "Efficacy"].startswith("100.0 [")
    gen = {"m": {"pmet": {**recorded["m"]["pmet"], "fluency": 600.0}}}  # recorded with generation (fluency)
    assert regenerate_table("table1_m", entry, gen, [run]).reason == "per-record file differs in generation: m PMET n=2"
    other = {"m": {"pmet": {**recorded["m"]["pmet"], "efficacy": 50.0}}}
    assert "other results" in regenerate_table("table1_m", entry, other, [run]).reason
    assert regenerate_table("table1_m", entry, recorded, []).reason == "no per-record file: m PMET n=2"
    assert "not recorded" in regenerate_table("table1_m", entry, None, [run]).reason
    assert "not made from edit runs" in regenerate_table("causal_trace_m_curve", {}, None, [run]).reason
    assert "results/<model>/sequential/" in regenerate_table("sequential_m", {}, None, [run]).reason


@needs_committed_runs
def test_committed_tables_each_regenerated_or_named(tmp_path, capsys):
    """From the committed run files and the committed tables' records (manifest + summaries; the committed CSVs
    are not copied): every committed table gets one line; a regenerated one equals the committed CSV; Table 1
    (smollm2, bf16) is one of them."""
    from pmet.cli import main

    (tmp_path / "tables").mkdir()
    for p in [TABLES / "manifest.json", *TABLES.glob("*.json")]:
        shutil.copy(p, tmp_path / "tables" / p.name)
    shutil.copytree(RESULTS, tmp_path / "results")
    assert main(["report", "--out-dir", str(tmp_path), "--tables-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    manifest = json.loads((TABLES / "manifest.json").read_text())
    stems = sorted(k.removesuffix(".csv") for k in manifest if k.endswith(".csv"))
    assert sorted(line.split(":")[0].split(".")[0].split(" ")[-1].removeprefix("tables/") for line in lines) == stems
    for line in lines:
        if line.startswith("wrote tables/"):
            stem = line.removeprefix("wrote tables/").split(".")[0]
            assert (tmp_path / "tables" / f"{stem}.csv").read_text() == (TABLES / f"{stem}.csv").read_text(), stem
    # Table 1 (smollm2, bf16, 100 edits with generation): all six editors' runs are committed, so it is rebuilt,
    # equal to the committed CSV (checked above)
    assert any(line.startswith(f"wrote tables/{TABLE1}") for line in lines), lines
    # Fig. 4's data (100 edits, bf16) comes from Table 3's four committed ablation runs
    assert any(line.startswith("wrote tables/fig4_delta_norms_smollm2_bfloat16") for line in lines), lines
