"""Run specifications, the names derived from them, and the notebooks' guarded outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pmet.runspec import RunSpec, artifact_name, model_label, precision_of, precision_of_runs, results_path, spec_of


def test_run_tag_and_folder_keep_the_old_layout(tmp_path):
    """Existing caches stay valid: the folder is runs/<model>/<dataset>/<method>/n{n}_seed{seed}_hp{id}[_gen]."""
    from pmet.runcache import run_folder, trajectory_path

    spec = RunSpec("smollm2", "pmet", "counterfact", 100, 0, generation=True, value_autocast="bfloat16")
    assert spec.run_tag("abc") == "n100_seed0_hpabc_gen"
    assert run_folder(spec, "abc", tmp_path) == tmp_path / "smollm2" / "counterfact" / "pmet" / "n100_seed0_hpabc_gen"
    rome = RunSpec("smollm2", "rome", "zsre", 7, 3)
    expected = tmp_path / "smollm2" / "zsre" / "rome" / "trajectory_seed3_hpx.safetensors"
    assert trajectory_path(rome, "x", tmp_path) == expected


def test_spec_validates_and_round_trips():
    spec = RunSpec("m", "pmet", overrides={"clamp_norm_factor": 0.75, "unset": None})
    assert spec.overrides == (("clamp_norm_factor", 0.75),) and hash(spec)
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.hparam_overrides() == {"clamp_norm_factor": 0.75}
    assert spec.replace(value_autocast="bfloat16").hparam_overrides()["v_autocast"] == "bfloat16"
    for bad in (
        dict(dataset="zsre2"),
        dict(value_autocast="int8"),
        dict(n_edits=0),
        dict(n_edits=2.5),
        dict(overrides={"v_autocast": "bfloat16"}),
    ):
        with pytest.raises(ValueError):
            RunSpec("m", "pmet", **bad)


def test_names_come_from_one_place():
    assert artifact_name("table1", ["smollm2", "gemma3-270m"]) == "table1_smollm2_gemma3-270m"
    assert artifact_name("table1", "smollm2", "bfloat16") == "table1_smollm2_bfloat16"
    assert artifact_name("table3", "smollm2", "float32", seed=2) == "table3_smollm2_seed2"
    assert artifact_name("table1", "smollm2", "bfloat16", tag="n1590") == "table1_smollm2_bfloat16_n1590"
    with pytest.raises(ValueError, match="tag"):
        artifact_name("table1", "smollm2", tag="a/b")
    assert model_label("smollm2", "bfloat16") == "smollm2 (values bfloat16)" and model_label("smollm2") == "smollm2"
    spec = RunSpec("smollm2", "memit", "zsre", 200, value_autocast="bfloat16")
    assert str(results_path("/r", spec, "h1")) == "/r/results/smollm2/zsre/memit_n200_seed0_hph1.jsonl.gz"


def test_precision_is_read_from_metadata_not_names():
    new = {"spec": RunSpec("m", "pmet", value_autocast="bfloat16").to_dict()}
    legacy = {"model": "m", "method": "pmet", "n_edits": 5, "seed": 0, "hparams_values": {"v_autocast": "bfloat16"}}
    plain = {"model": "m", "method": "ft", "hparams_values": {"lr": 1e-3}}
    assert precision_of(new) == precision_of(legacy) == "bfloat16" and precision_of(plain) == "float32"
    assert spec_of(legacy)["n_edits"] == 5
    assert precision_of_runs([new, plain, {"unavailable": "x"}]) == "bfloat16"
    assert precision_of_runs([plain]) == "float32"
    assert precision_of_runs([new, {"spec": RunSpec("m", "pmet", value_autocast="float16").to_dict()}]) == "mixed"


# ---- notebook outputs --------------------------------------------------------------------------------------
def _nb(tmp_path, **params):
    from pmet.notebook import Notebook

    return Notebook("table1", {"model": "m", "n_edits": 5, "out_dir": str(tmp_path), "overwrite": False, **params})


def test_an_output_made_with_another_configuration_is_never_replaced(tmp_path, monkeypatch):
    from pmet.notebook import OutputExists

    df = pd.DataFrame({"a": [1]})
    art = _nb(tmp_path).artifact("table1", "m", sizes={"m": 5})
    art.save_table(df, "caption")
    art.save_summaries({"m": {}})
    again = _nb(tmp_path).artifact("table1", "m", sizes={"m": 5})  # same configuration: may rewrite its files
    again.save_table(df, "caption")
    with pytest.raises(OutputExists, match="-p out_dir .* -p overwrite True"):
        _nb(tmp_path, n_edits=6).artifact("table1", "m", sizes={"m": 6})  # refused before anything runs
    with pytest.raises(OutputExists):
        _nb(tmp_path).artifact("table1", "m", sizes={"m": 6})
    _nb(tmp_path).artifact("table1", "m", "bfloat16", sizes={"m": 6})  # another name: no clash
    forced = _nb(tmp_path, n_edits=6, overwrite=True).artifact("table1", "m", sizes={"m": 6})
    forced.save_table(df, "new caption")
    entry = json.loads((tmp_path / "tables" / "manifest.json").read_text())["table1_m.md"]
    assert entry["config"]["n_edits"] == 6 and entry["config"]["sizes"] == {"m": 6}


def test_default_out_dir_is_fresh_and_the_repository_needs_overwrite(monkeypatch):
    from pmet.notebook import OutputExists, resolve_out_dir
    from pmet.paths import REPO_ROOT

    a = resolve_out_dir(None, False, "table1")
    assert a.parent == REPO_ROOT / "out" and a.name.startswith("table1-") and not a.exists()
    assert resolve_out_dir(None, True, "table1") == REPO_ROOT
    assert str(resolve_out_dir("/x", True, "table1")) == "/x"
    with pytest.raises(OutputExists, match="overwrite True"):
        _nb(REPO_ROOT, out_dir=str(REPO_ROOT))


def test_run_files_get_finite_summaries():
    """A one-record run's CI is NaN; the committed run file (strict JSON) gets None there instead."""
    from pmet.runstore import finite as _finite

    assert _finite({"a": [float("nan"), 1.0], "b": {"c": float("inf")}, "d": "x"}) == {
        "a": [None, 1.0],
        "b": {"c": None},
        "d": "x",
    }
