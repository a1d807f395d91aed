import json

import pytest

from pmet.claims import claims_frame, save_summaries, verdict, write_claims
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
    monkeypatch.setattr(experiments, "run_edit_eval",
                        lambda model, tok, spec, **k: calls.append((model, spec.method, spec.n_edits)) or {"n_edits": spec.n_edits})
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


def test_verdicts():
    a, b = _s(efficacy=(90, 88, 92)), _s(efficacy=(80, 78, 82))
    assert verdict(a, b, "efficacy", +1)[0] == "holds"
    assert verdict(a, b, "efficacy", -1)[0] == "does not hold"
    c = _s(efficacy=(81, 75, 87))
    assert verdict(c, b, "efficacy", +1)[0] == "inconclusive (CIs overlap)"
    assert verdict(a, {}, "efficacy", +1)[0] == "not measured"


def test_tables_and_claims_roundtrip(tmp_path):
    pm = _s(efficacy=(99, 98, 100), generalization=(90, 88, 92), specificity=(60, 58, 62))
    pm["score"] = 80.0
    me = _s(efficacy=(95, 94, 96), generalization=(80, 78, 82), specificity=(70, 68, 72))
    me["score"] = 80.5
    mf = _s(efficacy=(99, 98, 100), generalization=(95, 94, 96), specificity=(60, 58, 62))
    grid = {"m": {"memit": me, "pmet": pm, "mend": {"unavailable": "not trained", "n_edits": 10}},
            "g": {"memit-ffn": mf, "pmet": pm}}
    t = grid_table({"m": grid["m"]})
    assert list(t.Editor) == ["MEMIT", "PMET", "MEND"] and t.loc[2, "Efficacy"] == "n/a"
    assert t.loc[1, "Efficacy"] == "99.0 (1.0)"
    paths = save_table(t, "table1_m", tmp_path, "caption")
    assert all(p.exists() for p in paths) and "caption" in paths[1].read_text()
    assert json.loads((tmp_path / "tables" / "manifest.json").read_text())["table1_m.csv"]["caption"] == "caption"
    save_summaries(grid, "table1_m", tmp_path)
    df = write_claims(tmp_path)
    got = dict(zip(df.claim, df.verdict))
    assert got["PMET > MEMIT on efficacy"] == "holds"
    assert got["PMET < MEMIT on specificity"] == "holds"
    assert got["PMET > MEMIT on score"] == "inconclusive (no CI)"
    assert got["PMET > MEMIT (δ on m^L) on generalization"] == "does not hold"
    assert got["PMET > MEMIT (δ on m^L) on efficacy"].startswith("inconclusive")
    assert (tmp_path / "tables" / "claims.md").read_text().startswith("# The paper's claims")
    low = {m: {k: {**v, "spec": {"model": m, "method": k, "value_autocast": "bfloat16"}} for k, v in runs.items()}
           for m, runs in grid.items()}
    save_summaries(low, "table1_m_bfloat16", tmp_path)  # rendered with value_autocast="bfloat16": in the specs
    assert {"m", "m (values bfloat16)"} <= set(write_claims(tmp_path).query("artifact == 'Table 1'").model)


def test_claims_name_the_consistency_proxy(tmp_path):
    """Our consistency is the offline proxy wherever ROME's reference texts are missing: claims say so."""
    pm = _s(efficacy=(99, 98, 100), fluency=(600, 598, 602), consistency_proxy=(25, 24, 26))
    me = _s(efficacy=(95, 94, 96), fluency=(590, 588, 592), consistency_proxy=(20, 19, 21))
    save_summaries({"m": {"memit": me, "pmet": pm}}, "table1_m", tmp_path)
    df = claims_frame(tmp_path)
    got = dict(zip(df.claim, df.verdict))
    assert got["PMET > MEMIT on consistency (proxy)"] == "holds"
    assert got["PMET > MEMIT on fluency"] == "holds"
    t = grid_table({"m": {"memit": me, "pmet": pm}})
    assert "Consistency (proxy)" in t.columns and list(t["n records"]) == ["10/0/0/10/10"] * 2
    save_summaries({"m": {"memit": _s(efficacy=(95, 94, 96)), "pmet": _s(efficacy=(99, 98, 100))}}, "table1_m",
                   tmp_path)  # no generation: nothing measured, no proxy named
    df = claims_frame(tmp_path)
    assert dict(zip(df.claim, df.verdict))["PMET > MEMIT on consistency"] == "not measured"


def test_sweep_claims_count_points_in_each_direction(tmp_path):
    hi, lo, mid = (90, 88, 92), (50, 48, 52), (89, 80, 95)
    sweep = {
        (1, "pmet"): _s(efficacy=hi, generalization=hi, specificity=lo),
        (1, "memit"): _s(efficacy=mid, generalization=lo, specificity=hi),
        (1, "rome"): _s(efficacy=lo, generalization=hi, specificity=hi),
        (10, "pmet"): _s(efficacy=hi, generalization=lo, specificity=lo),
        (10, "memit"): _s(efficacy=mid, generalization=lo, specificity=hi),
        (10, "rome"): _s(efficacy=lo, generalization=lo, specificity=mid),
    }
    save_summaries(sweep, "fig3_sweep_m", tmp_path)
    df = write_claims(tmp_path)
    got = dict(zip(df.claim, df.verdict))
    assert got["PMET > MEMIT on efficacy across edit counts"] == "inconclusive (CIs overlap)"
    assert got["PMET > MEMIT on generalization across edit counts"] == "holds"  # 1 of 2, never against
    assert got["PMET < MEMIT on specificity across edit counts"] == "holds"
    assert got["PMET > ROME on efficacy across edit counts"] == "holds"
    assert got["PMET > ROME on generalization across edit counts"] == "inconclusive (CIs overlap)"
    assert got["PMET > ROME on specificity across edit counts"] == "does not hold"
    ours = dict(zip(df.claim, df.ours))
    assert ours["PMET > ROME on efficacy across edit counts"].startswith("2 of 2 points")
    low = {k: {**v, "model": "m", "spec": {"value_autocast": "bfloat16"}} for k, v in sweep.items()}
    save_summaries(low, "fig3_sweep_m_bfloat16", tmp_path)  # the precision is read from the runs' specs
    assert set(claims_frame(tmp_path).model) == {"m", "m (values bfloat16)"}


def test_ablation_table_marks_differences(tmp_path):
    s = {(10, "pmet"): _s(efficacy=(90, 0, 0)), (10, "pmet-even-spread"): _s(efficacy=(80, 0, 0))}
    t = ablation_table(s)
    assert list(t.Editor) == ["PMET", "Even spread"]
    assert t.loc[1, "Efficacy"] == "80.0 (↓10.0)"
    save_summaries(s, "table3_m", tmp_path)
    df = claims_frame(tmp_path)
    assert (df.artifact == "Table 3").any()
    low = {k: {**v, "model": "m", "spec": {"value_autocast": "bfloat16"}} for k, v in s.items()}
    save_summaries(low, "table3_m_bfloat16", tmp_path)  # rendered with value_autocast="bfloat16": in the specs
    models = set(claims_frame(tmp_path).query("artifact == 'Table 3'").model)
    assert models == {"m", "m (values bfloat16)"}


def test_size_note_only_below_the_default():
    from pmet.report import size_note

    assert size_note(1000, 1000) == "" and size_note(2000, 1000, "x") == ""
    assert size_note(100, 1000) == " Fewer edits than the notebook's default of 1,000."
    assert size_note(100, 1000, "CPU budget") == " Fewer edits than the notebook's default of 1,000: CPU budget."


def test_configure_reads_json_lists_and_dicts_given_as_text(monkeypatch):
    """``papermill -p models '["a", "b"]'`` hands the notebook a string; configure makes it the list."""
    from pmet.notebook import configure

    monkeypatch.delenv("PMET_NOTEBOOK_SMALL", raising=False)
    cfg = configure({"models": '["a", "b"]', "n_edits": '{"a": 3}', "model": "smollm2", "methods": ["x"],
                     "out_dir": "."})
    assert cfg.models == ["a", "b"] and cfg.n_edits == {"a": 3} and cfg.model == "smollm2" and cfg.methods == ["x"]
    with pytest.raises(ValueError, match="-y"):
        configure({"models": "[smollm2, gemma]", "out_dir": "."})
