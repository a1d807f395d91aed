"""The value optimisation's diagnostics (pmet.diagnostics): recorded per request and site, identical from the
value cache, carried to the run folder and the committed results, rebuilt from the caches, summarised."""

import json

import pytest

from pmet.diagnostics import (
    FIELD,
    RUN_FILE,
    add_to_results_file,
    backfill,
    diagnostics_frame,
    diagnostics_of,
    read_run_diagnostics,
    write_tables,
)
from pmet.editing import edit, normalize_requests
from pmet.editing.editor import current_outputs
from pmet.runstore import StoredRun, read_run, write_run

REQS = [
    {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "Paris"},
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "basketball"},
    {"prompt": "The capital of {} is", "subject": "Italy", "target_new": " London"},
]
FAST = {"v_num_grad_steps": 5}

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- per request
@pytest.mark.parametrize("clamp", [None, 0.01])
def test_pmet_records_every_request_and_site(tiny_models, tmp_cache, clamp):
    """Every request gets both sites' |δ|/|init|, with init (a^L, m^L at the subject's last token of the plain
    prompt) computed here independently of the optimiser; a tiny clamp puts every δ at the clamp."""
    model, tok = tiny_models["tiny-llama"]
    reqs = normalize_requests(REQS, tok)
    L = max(model.layout.critical_layers)
    init = {s: current_outputs(model, tok, reqs, (s, L)) for s in ("mlp", "attn")}
    hp = {**FAST, **({"clamp_norm_factor": clamp} if clamp else {})}
    result = edit(model, tok, REQS, method="pmet", hparams=hp, progress=False)
    result.restore()
    diags = diagnostics_of(result)
    factor = result.hparams.clamp_norm_factor
    assert [d["case_id"] for d in diags] == [r["case_id"] for r in result.requests] == [0, 1, 2]
    for i, (d, info) in enumerate(zip(diags, result.value_info)):
        assert not any(k.endswith("_block") for k in d)
        for s in ("mlp", "attn"):
            expect = float((result.values[s][i] - init[s][i]).norm() / init[s][i].norm())
            assert d[f"ratio_{s}"] == pytest.approx(expect, rel=1e-4), (i, s)
            assert d[f"at_clamp_{s}"] == (expect >= factor * (1 - 1e-3)), (i, s)
            if clamp:
                assert d[f"at_clamp_{s}"] and d[f"ratio_{s}"] == pytest.approx(clamp, rel=1e-4)
        assert d["clamp"] == factor
        assert d["steps"] == info["steps"] and d["stopped_early"] == info["stopped_early"]
        for k in ("nll", "kl", "loss", "prob"):
            assert d[k] == pytest.approx(info[k], rel=1e-5)
        assert 0 < d["prob"] <= 1 and d["steps"] <= FAST["v_num_grad_steps"]


@pytest.mark.parametrize(
    "method,sites", [("pmet-no-attn-delta", {"mlp"}), ("memit", {"block"}), ("rome", {"mlp"}), ("ft", None)]
)
def test_sites_per_editor(tiny_models, tmp_cache, method, sites):
    model, tok = tiny_models["tiny-llama"]
    result = edit(model, tok, REQS[:2], method=method, hparams=FAST if method != "ft" else None, progress=False)
    result.restore()
    diags = diagnostics_of(result)
    if sites is None:
        assert diags is None  # FT-W optimises no value vectors
        return
    assert len(diags) == 2
    assert {k[len("ratio_") :] for d in diags for k in d if k.startswith("ratio_")} == sites


def test_cached_values_give_identical_diagnostics(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-gpt2"]
    first = edit(model, tok, REQS, method="pmet", hparams=FAST, progress=False)
    first.restore()
    second = edit(model, tok, REQS, method="pmet", hparams=FAST, progress=False)
    second.restore()
    assert not any(i["cached"] for i in first.value_info) and all(i["cached"] for i in second.value_info)
    assert diagnostics_of(first) == diagnostics_of(second)


# ---------------------------------------------------------------------------------------------- runs
def test_run_folder_committed_results_and_backfill(tiny_models, tmp_cache, tmp_path, monkeypatch):
    """A run keeps its diagnostics in its folder, save_runs puts them into the committed rows, and the backfill
    rebuilds both from the value cache alone (the editor is never called)."""
    import pmet.editing
    import pmet.editing.values
    from pmet.experiments import run_edit_eval
    from pmet.notebook import Notebook
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-llama"]
    spec = RunSpec("tiny-llama", "pmet", n_edits=3, overrides=tuple(FAST.items()))
    summary = run_edit_eval(model, tok, spec, progress=False)
    folder = next((tmp_cache / "runs").rglob(RUN_FILE)).parent
    kept = read_run_diagnostics(folder)
    assert len(kept) == 3 and all("ratio_attn" in d and "ratio_mlp" in d for d in kept)

    (path,) = Notebook("t", {"out_dir": str(tmp_path / "a")}).save_runs({"tiny-llama": {"pmet": summary}})
    stored = read_run(path)
    assert {r["case_id"]: r[FIELD] for r in stored.rows} == {
        d["case_id"]: {k: v for k, v in d.items() if k != "case_id"} for d in kept
    }
    committed = path.read_bytes()

    # a run made before diagnostics were kept: no run file, a committed file without the field
    (folder / RUN_FILE).unlink()
    old = write_run(
        path, stored.spec, stored.summary, [{k: v for k, v in r.items() if k != FIELD} for r in stored.rows]
    )
    assert FIELD not in read_run(old).rows[0]
    monkeypatch.setattr(pmet.editing, "edit", lambda *a, **k: pytest.fail("edited again"))
    monkeypatch.setattr(pmet.editing.values, "optimize_batch", lambda *a, **k: pytest.fail("optimised again"))
    out = backfill(spec, model=model, tok=tok, results_root=tmp_path / "a")
    assert out["n"] == 3 and out["results"] == path
    assert read_run_diagnostics(folder) == kept
    assert path.read_bytes() == committed  # the same file save_runs writes now


def test_backfill_names_what_is_missing(tiny_models, tmp_cache):
    from pmet.diagnostics import DiagnosticsUnavailable
    from pmet.experiments import run_edit_eval
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-llama"]
    spec = RunSpec("tiny-llama", "memit", n_edits=2, overrides=tuple(FAST.items()))
    with pytest.raises(DiagnosticsUnavailable, match="no run folder"):
        backfill(spec, model=model, tok=tok)
    from pmet.diagnostics import main

    assert (
        main(
            ["backfill", "--model", "tiny-llama", "--method", "memit", "--n-edits", "2", "--set", "v_num_grad_steps=5"]
        )
        == 2
    )
    run_edit_eval(model, tok, spec, progress=False)
    for f in (tmp_cache / "values").rglob("*.safetensors"):
        f.unlink()
    with pytest.raises(DiagnosticsUnavailable, match="2 of the run's 2 value vectors"):
        backfill(spec, model=model, tok=tok)
    with pytest.raises(ValueError, match="no value vectors"):
        backfill(RunSpec("tiny-llama", "ft", n_edits=2), model=model, tok=tok)


def test_rome_sweep_keeps_diagnostics_per_size(tiny_models, tmp_cache):
    from pmet.experiments import run_sweep
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-gptj"]
    spec = RunSpec("tiny-gptj", "rome", overrides=tuple(FAST.items()))
    run_sweep(model, tok, spec, [1, 2], progress=False)
    kept = {len(d): d for d in (read_run_diagnostics(p.parent) for p in (tmp_cache / "runs").rglob(RUN_FILE))}
    assert sorted(kept) == [1, 2] and kept[1] == kept[2][:1]
    assert set(kept[2][0]) >= {"ratio_mlp", "at_clamp_mlp", "steps", "nll", "prob"}
    folder = next(p.parent for p in (tmp_cache / "runs").rglob(RUN_FILE) if "n2_" in p.parent.name)
    (folder / RUN_FILE).unlink()
    backfill(spec.replace(n_edits=2), model=model, tok=tok)  # from the trajectory file
    assert read_run_diagnostics(folder) == kept[2]


# ---------------------------------------------------------------------------------------------- the table
def _diag(ratio_key, ratio, at, steps, early, top, nll, prob, clamp=0.75):
    d = {"clamp": clamp, "steps": steps, "stopped_early": early, "target_is_top": top, "nll": nll, "prob": prob}
    d.update(kl=0.0, loss=nll)
    for k, r, a in zip(ratio_key, ratio, at):
        d[f"ratio_{k}"], d[f"at_clamp_{k}"] = r, a
    return d


def _stored(method, diags, n_edits=5, autocast=None, hp=True):
    spec = {"model": "m", "method": method, "dataset": "counterfact", "n_edits": n_edits, "seed": 0}
    spec.update(value_autocast=autocast, overrides={}, hparams_values={"clamp_norm_factor": 0.75} if hp else None)
    rows = [{"case_id": i, "efficacy": 1.0, **({FIELD: d} if d else {})} for i, d in enumerate(diags)]
    return StoredRun(spec=spec, summary={}, rows=rows)


SYNTHETIC_PMET = [
    # (attn ratio, mlp ratio), (attn at clamp, mlp at clamp), steps, stopped early, target top, nll, prob
    _diag(("attn", "mlp"), (0.1, 0.5), (False, False), 3, True, True, 0.1, 0.9),
    _diag(("attn", "mlp"), (0.2, 0.75), (False, True), 10, True, True, 0.2, 0.8),
    _diag(("attn", "mlp"), (0.3, 0.75), (False, True), 29, False, True, 0.3, 0.7),
    _diag(("attn", "mlp"), (0.4, 0.2), (False, False), 29, False, False, 0.4, 0.6),
    _diag(("attn", "mlp"), (1.0, 0.1), (True, False), 4, True, True, 0.5, 0.5),
]


def test_table_hand_checked():
    memit = [
        _diag(("block",), (0.2,), (False,), 7, True, True, 1.0, 0.2),
        _diag(("block",), (0.4,), (False,), 9, True, False, 2.0, 0.4),
    ]
    runs = [
        _stored("pmet", SYNTHETIC_PMET),
        _stored("memit", memit, autocast="bfloat16"),
        _stored("memit", [None] * 3, n_edits=3),  # a run made before diagnostics were kept
        _stored("ft", [None] * 3, hp=False),  # no value vectors: never listed
    ]
    df, skipped = diagnostics_frame(runs)
    assert skipped == ["memit n=3 (float32)"]
    assert list(df.method) == ["memit", "pmet"]  # sorted by (dataset, n_edits, method, ...)
    p = df[df.method == "pmet"].iloc[0]
    assert p.requests == 5 and p.clamp == 0.75 and p.precision == "float32"
    # attn ratios 0.1 0.2 0.3 0.4 1.0: median 0.3, p90 = 0.4 + 0.6 (1.0 - 0.4) = 0.76, one of five at the clamp
    assert (p["attn ratio median"], p["attn ratio p90"], p["attn at clamp %"]) == (0.3, 0.76, 20.0)
    # mlp ratios sorted 0.1 0.2 0.5 0.75 0.75: median 0.5, p90 = 0.75, two of five at the clamp
    assert (p["mlp ratio median"], p["mlp ratio p90"], p["mlp at clamp %"]) == (0.5, 0.75, 40.0)
    assert pd_isna(p["block ratio median"])
    # steps 3 4 10 29 29: median 10; stopped early 3/5; target top 4/5; nll mean 0.3, prob mean 0.7
    assert (p["steps median"], p["stopped early %"], p["target top %"]) == (10.0, 60.0, 80.0)
    assert (p["nll mean"], p["prob mean"]) == (0.3, 0.7)
    m = df[df.method == "memit"].iloc[0]
    assert m.precision == "bfloat16" and m.requests == 2
    # block ratios 0.2 0.4: median 0.3, p90 = 0.2 + 0.9 * 0.2 = 0.38
    assert (m["block ratio median"], m["block ratio p90"], m["block at clamp %"]) == (0.3, 0.38, 0.0)
    assert (m["steps median"], m["stopped early %"], m["target top %"], m["nll mean"], m["prob mean"]) == (
        8.0,
        100.0,
        50.0,
        1.5,
        0.3,
    )
    assert pd_isna(m["attn ratio median"])


def pd_isna(x) -> bool:
    import pandas as pd

    return bool(pd.isna(x))


def test_write_tables_from_committed_files(tmp_path):
    from pmet.diagnostics import main

    res = tmp_path / "results" / "m" / "counterfact"
    for run in (_stored("pmet", SYNTHETIC_PMET), _stored("memit", [None] * 2, n_edits=2)):
        write_run(res / f"{run.spec['method']}_n{run.spec['n_edits']}.jsonl.gz", run.spec, {}, run.rows)
    written = write_tables(tmp_path)
    assert sorted(p.name for p in written) == [f"value_diagnostics_m.{e}" for e in ("csv", "md", "tex")]
    md = (tmp_path / "tables" / "value_diagnostics_m.md").read_text()
    assert "memit n=2 (float32)" in md and "| pmet |" in md
    assert write_tables(tmp_path) == []  # unchanged: nothing rewritten
    manifest = json.loads((tmp_path / "tables" / "manifest.json").read_text())
    assert "value_diagnostics_m.csv" in manifest
    assert main(["table", "--out-dir", str(tmp_path)]) == 0


def test_add_to_results_file_checks_the_records(tmp_path):
    run = _stored("pmet", [None] * 2, n_edits=2)
    path = write_run(tmp_path / "r.jsonl.gz", run.spec, {}, run.rows)
    with pytest.raises(ValueError, match="not the 3 requests"):
        add_to_results_file(path, [{"case_id": i, "steps": 1} for i in range(3)])
    add_to_results_file(path, [{"case_id": i, "steps": i} for i in range(2)])
    assert [r[FIELD] for r in read_run(path).rows] == [{"steps": 0}, {"steps": 1}]
