import numpy as np
import pandas as pd
import pytest

from pmet.claims import write_claims
from pmet.report import ablation_table, grid_table, save_table, sweep_sizes


def _s(**kw):
    out = {"n_edits": 10}
    for k, (m, lo, hi) in kw.items():
        out[k], out[f"{k}_ci"], out[f"{k}_n"] = m, (lo, hi), 10
    return out


def test_sweep_sizes_follow_the_paper():
    sizes = sweep_sizes(10_000)
    assert sizes[0] == 1 and sizes[-1] == 10_000 and len(sizes) == 17
    assert 5623 in sizes  # the paper's middle size of Table 3
    assert sweep_sizes(4) == [1, 2, 3, 4]


def test_run_grid_per_model_methods_and_sizes(tmp_path, monkeypatch):
    from pmet import experiments

    calls = []
    monkeypatch.setattr(
        experiments,
        "run_edit_eval",
        lambda model, tok, spec, **k: calls.append((model, spec.method, spec.n_edits)) or {"n_edits": spec.n_edits},
    )
    monkeypatch.setattr("pmet.models.load_model", lambda name, device="cpu": (name, None))
    grid = experiments.run_grid(["a", "b"], {"a": ["none", "pmet"], "b": ["pmet"]}, n_edits={"a": 3, "b": 2})
    assert calls == [("a", "none", 3), ("a", "pmet", 3), ("b", "pmet", 2)]
    assert set(grid["a"]) == {"none", "pmet"} and set(grid["b"]) == {"pmet"}


def test_resolve_n_edits_paper_default_and_per_model():
    from pmet.experiments import resolve_n_edits

    assert resolve_n_edits("gptj", None, 1000) == 10_000 and resolve_n_edits("smollm2", None, 1000) == 1000
    assert resolve_n_edits("gptj", 7, 1000) == 7
    per_model = {"smollm2": 100, "gemma3-270m": 50}
    assert resolve_n_edits("gemma3-270m", per_model, 1000) == 50
    assert resolve_n_edits("neox", per_model, 1000) == 10_000  # not named: the default rule


def test_size_note_only_below_the_default():
    from pmet.report import size_note

    assert size_note(1000, 1000) == "" and size_note(2000, 1000, "x") == ""
    assert size_note(100, 1000) == " Fewer edits than the notebook's default of 1,000."
    assert size_note(100, 1000, "CPU budget") == " Fewer edits than the notebook's default of 1,000: CPU budget."


def test_configure_reads_json_lists_and_dicts_given_as_text(monkeypatch):
    """``papermill -p models '["a", "b"]'`` hands the notebook a string; configure makes it the list."""
    from pmet.notebook import configure

    monkeypatch.delenv("PMET_NOTEBOOK_SMALL", raising=False)
    cfg = configure(
        {"models": '["a", "b"]', "n_edits": '{"a": 3}', "model": "smollm2", "methods": ["x"], "out_dir": "."}
    )
    assert cfg.models == ["a", "b"] and cfg.n_edits == {"a": 3} and cfg.model == "smollm2" and cfg.methods == ["x"]
    with pytest.raises(ValueError, match="-y"):
        configure({"models": "[smollm2, gemma]", "out_dir": "."})


def _run(tmp_path, method, rows, n=None, seed=0, dataset="counterfact", **summary):
    from pmet.runstore import write_run

    spec = {
        "model": "m",
        "dataset": dataset,
        "method": method,
        "n_edits": n or len(rows),
        "seed": seed,
        "generation": True,
        "value_autocast": None,
        "overrides": {},
    }
    return write_run(tmp_path / "results" / f"{method}_n{spec['n_edits']}_s{seed}.jsonl.gz", spec, summary, rows)


def _cf_rows(eff, gen, spec, flu=None):
    return [
        {
            "case_id": i,
            "efficacy": e,
            "generalization": g,
            "specificity": s,
            **({"fluency": f} if flu is not None else {}),
        }
        for i, (e, g, s, f) in enumerate(zip(eff, gen, spec, flu if flu is not None else [None] * len(eff)))
    ]


def test_claims_from_two_synthetic_run_files(tmp_path):
    """Two editors on the same 60 records: PMET wins efficacy on 20 records and never loses (exact McNemar
    p = 2^-19), generalization is identical, specificity is lower for PMET (paper's sign vs MEMIT)."""
    rng = np.random.default_rng(0)
    n = 60
    gen = rng.choice([0.0, 0.5, 1.0], n)
    spec_m = rng.random(n)
    _run(tmp_path, "memit", _cf_rows([1.0] * 40 + [0.0] * 20, gen, spec_m, rng.normal(6, 0.1, n)))
    _run(
        tmp_path,
        "pmet",
        _cf_rows([1.0] * 60, gen, spec_m - 0.2 - 0.01 * rng.random(n), rng.normal(6, 0.1, n)),
        edit_seconds=10.0,
    )
    ledger = write_claims(tmp_path, n_resamples=999)
    md = (tmp_path / "tables" / "claims.md").read_text()
    assert md.startswith("# The paper's claims") and "Holm" in md
    detail = pd.read_csv(tmp_path / "tables" / "claims_detail.csv")
    t1 = detail[(detail.artifact == "Table 1") & (detail.block == "GPT-J")].set_index("claim")
    eff = t1.loc["PMET > MEMIT on efficacy"]
    assert eff.test.startswith("exact McNemar (20:0") and eff.p == pytest.approx(2 * 0.5**20)
    assert eff["diff"] == pytest.approx(100 * 20 / 60, abs=1e-3) and eff.verdict == "holds"
    assert t1.loc["PMET > MEMIT on generalization"].verdict == "inconclusive"  # identical per record
    assert t1.loc["PMET < MEMIT on specificity"].verdict == "holds"
    assert t1.loc["PMET > MEMIT on score"].test.startswith("sign-flip permutation (Score)")
    fam = detail[(detail.artifact == "Table 1") & (detail.block == "GPT-J") & (detail.model == "m")]
    assert fam.set_index("claim").loc["PMET > MEMIT on consistency (proxy)"].verdict == "not measured in these runs"
    fam = fam.dropna(subset=["p"])
    assert (fam.p_holm >= fam.p - 1e-12).all() and fam.p_holm.max() <= 1
    # every ledger claim of Table 1 for model m comes from a paired test; no claim is silently missing
    rows = ledger[(ledger.artifact == "Table 1") & (ledger.model == "m")]
    assert len(rows) == 6 + 6  # GPT-J block vs MEMIT (6 metrics) and the NeoX block (6)
    assert set(rows.verdict) <= {"holds", "does not hold", "inconclusive", "not measured in these runs"}
    assert (ledger.verdict == "not yet run with per-record results").any()  # FT-W, MEND, ROME, Table 2, ...
    # a second seed (another record sample) is pooled, with its difference listed
    _run(tmp_path, "memit", _cf_rows([1.0] * 50 + [0.0] * 10, gen, spec_m), n=60, seed=1)
    _run(tmp_path, "pmet", _cf_rows([1.0] * 60, gen, spec_m), n=60, seed=1)
    assert write_claims(tmp_path, n_resamples=999) is not None
    detail = pd.read_csv(tmp_path / "tables" / "claims_detail.csv")
    eff = detail[(detail.artifact == "Table 1") & (detail.claim == "PMET > MEMIT on efficacy")].iloc[0]
    assert eff.seeds == "0,1" and eff.n_pairs == 120 and eff.test.startswith("exact McNemar (30:0")
    assert [round(float(x), 1) for x in eff.per_seed_diff.split()] == [33.3, 16.7]
    # ... and claims.md lists it in its record-samples section, with the per-seed differences
    md = (tmp_path / "tables" / "claims.md").read_text()
    section = md.split("## Several record samples (seeds)")[1]
    line = next(x for x in section.splitlines() if "PMET > MEMIT on efficacy" in x and "| GPT-J |" in x)
    assert "| 60 | 0, 1 | +25.0 [" in line and "| +33.3 / +16.7 |" in line and line.endswith("| holds |")


def test_claims_command_runs_on_the_committed_files(tmp_path):
    """`python -m pmet report` regenerates the ledger from the repository's committed files (offline)."""
    import shutil

    from pmet.paths import REPO_ROOT

    shutil.copytree(REPO_ROOT / "tables", tmp_path / "tables")
    if (REPO_ROOT / "results").exists():
        shutil.copytree(REPO_ROOT / "results", tmp_path / "results")
    from pmet.cli import main

    assert main(["report", "--out-dir", str(tmp_path), "--no-figures"]) == 0
    md = (tmp_path / "tables" / "claims.md").read_text()
    for claim in (
        "PMET > FT-W on score",
        "PMET < MEND on specificity",
        "PMET > ROME on efficacy",
        "w/o δ^a < PMET on generalization",
        "PMET's edit time",
        "smallest of PMET",
    ):
        assert claim in md, claim
    assert "inconclusive (no CI)" not in md
    from pmet.claims import FIG4_CLAIMS

    fig4 = [line for line in md.splitlines() if line.startswith("| Fig. 4")]
    assert all(any(c in line for line in fig4) for c in FIG4_CLAIMS)
    assert not any("not yet run" in line for line in fig4)  # the committed ablation runs measure all three
    assert "Table 2" in md and "GPT-NeoX" in md and "10,000 edits" in md and "5,623 edits" in md


def test_table_cells_all_have_intervals_inside_0_100(tmp_path):
    """Every cell has an interval, none of zero width, none outside [0, 100], even at 100% and n = 2; the
    caption names the method."""
    import re

    from pmet.evaluation import summarize_counterfact, summarize_zsre
    from pmet.report import sweep_frame

    perfect = _cf_rows([1.0, 1.0], [1.0, 1.0], [0.9, 1.0], [6.0, 6.1])
    mixed = _cf_rows([1.0, 0.0, 1.0], [0.5, 1.0, 0.0], [0.3, 0.6, 0.9], [5.0, 5.5, 6.0])
    grid = {
        "m": {
            "pmet": {**summarize_counterfact(perfect), "n_edits": 2},
            "memit": {**summarize_counterfact(mixed), "n_edits": 3},
        }
    }
    t = grid_table(grid)
    for col in ("Score", "Efficacy", "Generalization", "Specificity", "Fluency"):
        for cell in t[col]:
            mean, lo, hi = map(float, re.match(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", cell).groups())
            assert lo < hi and (col == "Fluency" or 0 <= lo <= mean <= hi <= 100), (col, cell)
    assert t.loc[0, "Efficacy"].startswith("100.0 [") and t.loc[0, "Efficacy"] != "100.0 [100.0, 100.0]"
    paths = save_table(t, "table1_m", tmp_path, "Table 1.")
    assert "Wilson" in paths[1].read_text().splitlines()[0]
    z = grid_table(
        {
            "m": {
                "pmet": {
                    **summarize_zsre(
                        [{"case_id": i, "efficacy": 1.0, "generalization": 0.5, "specificity": 0.0} for i in range(4)]
                    ),
                    "n_edits": 4,
                }
            }
        },
        "zsre",
    )
    assert all("[" in c and "[0.0, 0.0]" not in c for c in z[["Efficacy", "Generalization", "Specificity"]].iloc[0])
    a = ablation_table({(2, "pmet"): grid["m"]["pmet"], (2, "pmet-even-spread"): grid["m"]["memit"]})
    assert "[" in a.loc[1, "Efficacy"] and "↓" in a.loc[1, "Efficacy"] and "interval_note" in a.attrs
    f = sweep_frame({(2, "pmet"): grid["m"]["pmet"]})
    assert f.low.notna().all() and (f.high > f.low).all()


def test_editors_without_value_vectors_pair_with_every_value_precision(tmp_path):
    """FT-W has no value vectors, so its float32 run is the same run beside PMET's bf16-autocast values; a
    float32 MEMIT run is not (its values differ), so PMET vs MEMIT stays unpaired across precisions."""
    from pmet.runstore import write_run

    n = 30
    rows_ft = _cf_rows([0.0] * 20 + [1.0] * 10, [0.5] * n, [0.5] * n)
    rows_pmet = _cf_rows([1.0] * n, [0.5] * n, [0.5] * n)
    for method, rows, precision in (("ft", rows_ft, None), ("pmet", rows_pmet, "bfloat16"), ("memit", rows_ft, None)):
        spec = {
            "model": "m",
            "dataset": "counterfact",
            "method": method,
            "n_edits": n,
            "seed": 0,
            "generation": False,
            "value_autocast": precision,
            "overrides": {},
        }
        write_run(tmp_path / "results" / f"{method}.jsonl.gz", spec, {}, rows)
    write_claims(tmp_path, n_resamples=99)
    detail = pd.read_csv(tmp_path / "tables" / "claims_detail.csv")
    t1 = detail[(detail.artifact == "Table 1") & (detail.block == "GPT-J")]
    bf16 = t1[t1.model.str.contains("bfloat16")].set_index("claim")
    assert bf16.loc["PMET > FT-W on efficacy"].test.startswith("exact McNemar (20:0")
    # never paired with a float32 MEMIT run: no paired row for PMET vs MEMIT in the bf16 block
    assert "PMET > MEMIT on efficacy" not in bf16.index or not bf16.loc["PMET > MEMIT on efficacy"].n_pairs


def test_overrides_an_editor_lacks_do_not_separate_its_run(tmp_path):
    """ROME has no ``v_fast`` field (its spec records no overrides), so its run pairs with PMET's and MEMIT's
    ``v_fast`` runs on the same records; a MEMIT run without ``v_fast`` (MEMIT has the field) stays out of that
    block and pairs only with the PMET run made without it."""
    from pmet.claims import detail_frame
    from pmet.runstore import write_run

    n = 30
    lose = _cf_rows([0.0] * 20 + [1.0] * 10, [0.5] * n, [0.5] * n)
    win = _cf_rows([1.0] * n, [0.5] * n, [0.5] * n)

    def write(method, rows, overrides, name):
        spec = {"model": "m", "dataset": "counterfact", "method": method, "n_edits": n, "seed": 0}
        write_run(tmp_path / "results" / f"{name}.jsonl.gz", {**spec, "overrides": overrides}, {}, rows)

    write("pmet", win, {"v_fast": True}, "pmet_fast")
    write("rome", lose, {}, "rome")
    write("memit", lose, {}, "memit_plain")
    detail = detail_frame(tmp_path / "results", n_resamples=99)
    t1 = detail[(detail.artifact == "Table 1") & (detail.block == "GPT-J")]
    rome = t1[t1.claim == "PMET > ROME on efficacy"].set_index("model")
    assert list(rome.index) == ["m [v_fast=True]"] and rome.test.iloc[0].startswith("exact McNemar (20:0")
    assert t1[t1.claim == "PMET > MEMIT on efficacy"].empty  # MEMIT without v_fast: not PMET's block
    write("pmet", lose, {}, "pmet_plain")
    detail = detail_frame(tmp_path / "results", n_resamples=99)
    t1 = detail[(detail.artifact == "Table 1") & (detail.block == "GPT-J")]
    memit = t1[t1.claim == "PMET > MEMIT on efficacy"].set_index("model")
    assert list(memit.index) == ["m"] and memit.test.iloc[0].startswith("exact McNemar (0:0")
    # in the plain block ROME pairs with the plain PMET run (made with exactly that block's overrides)
    rome = t1[t1.claim == "PMET > ROME on efficacy"].set_index("model")
    assert sorted(rome.index) == ["m", "m [v_fast=True]"]


def test_runs_of_different_record_pools_are_never_paired(tmp_path):
    """RunSpec.pool: PMET drawn from the full files and MEMIT from the subsets (same model, size, seed, case ids)
    are different blocks, never paired; a run that records no pool is a subset run (written before pools were
    recorded) and pairs with one that says "subset"."""
    from pmet.runstore import write_run

    n = 30
    rows_memit = _cf_rows([0.0] * 20 + [1.0] * 10, [0.5] * n, [0.5] * n)
    rows_pmet = _cf_rows([1.0] * n, [0.5] * n, [0.5] * n)

    def write(method, rows, pool):
        spec = {"model": "m", "dataset": "counterfact", "method": method, "n_edits": n, "seed": 0, "pool": pool}
        write_run(tmp_path / "results" / f"{method}_{pool}.jsonl.gz", spec, {}, rows)

    write("pmet", rows_pmet, "full")
    write("memit", rows_memit, "subset")
    from pmet.claims import detail_frame

    assert detail_frame(tmp_path / "results", n_resamples=99).empty  # no two editors share a pool
    write("memit", rows_memit, "full")  # now both from the full files: paired, in a block named by its pool
    write("pmet", rows_pmet, None)  # no pool recorded = subset: pairs with the subset MEMIT run
    detail = detail_frame(tmp_path / "results", n_resamples=99)
    eff = detail[
        (detail.claim == "PMET > MEMIT on efficacy") & (detail.block == "GPT-J") & (detail.artifact == "Table 1")
    ]
    eff = eff.set_index("model")
    assert sorted(eff.index) == ["m", "m [full pool]"]
    assert (eff.n_pairs == n).all() and eff.test.str.startswith("exact McNemar (20:0").all()


def test_null_space_block_pairs_each_variant_with_its_base(tmp_path):
    """One batch: MEMIT-ns keeps 15 more records' specificity-like values than MEMIT and never does worse
    (holds), PMET-ns loses efficacy on 20 records against PMET (does not hold); only the pairs -ns vs base are
    tested, labelled beyond the paper, with no paper number."""
    rng = np.random.default_rng(1)
    n = 60
    gen = rng.choice([0.0, 0.5, 1.0], n)
    spec = rng.random(n) * 0.5
    _run(tmp_path, "memit", _cf_rows([1.0] * n, gen, spec))
    _run(tmp_path, "memit-ns", _cf_rows([1.0] * n, gen, spec + np.r_[[0.3] * 15, [0.0] * 45]))
    _run(tmp_path, "pmet", _cf_rows([1.0] * n, gen, spec))
    _run(tmp_path, "pmet-ns", _cf_rows([1.0] * 40 + [0.0] * 20, gen, spec))
    ledger = write_claims(tmp_path, n_resamples=999)
    ns = ledger[ledger.artifact == "Null space"].set_index("claim")
    assert len(ns) == 8 and (ns.paper == "—").all() and (ns.block == "beyond the paper (issue 19)").all()
    assert ns.loc["MEMIT-ns (AlphaEdit) > MEMIT on specificity"].verdict == "holds"
    assert ns.loc["PMET-ns > PMET on efficacy"].verdict == "does not hold"
    assert ns.loc["PMET-ns > PMET on specificity"].verdict == "inconclusive"  # identical per record
    assert "60 paired records" in ns.loc["PMET-ns > PMET on efficacy"].ours
    assert not ledger.claim.str.contains("PMET-ns > MEMIT|MEMIT-ns .* > PMET").any()
    assert "**Null space**" in (tmp_path / "tables" / "claims.md").read_text()
