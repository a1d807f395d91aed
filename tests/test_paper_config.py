"""The paper's configuration, offline: the complete data files make the table pools, a missing one is one clear
error with its URL, checksums by git blob id, and the dry-run plan (pmet.plan) on a tiny GPT-J."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
from pathlib import Path

import pytest

from pmet import data as D
from pmet import experiments as ex

CF_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
VAL = "counterfact/easyedit_mend_format/counterfact-val.json"
SUBSET = "counterfact/counterfact_subset_merged.json"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here touches the network: a download attempt fails at once."""

    def fail(url, *args, **kwargs):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(D, "_download", fail)


def _original(i: int) -> dict:
    """A synthetic record in ROME's full CounterFact schema."""
    subject = f"Person {i}"
    return {
        "case_id": i,
        "pararel_idx": i,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": subject,
        },
        "paraphrase_prompts": [f"{subject} speaks", f"{subject} was raised speaking"],
        "neighborhood_prompts": [f"The mother tongue of Other {i} is"] * 10,
        "attribute_prompts": [f"The mother tongue of Third {i} is"] * 10,
        "generation_prompts": [f"{subject} often says"] * 10,
    }


def _reduced(i: int) -> dict:
    subject = f"Person {i}"
    return {
        "case_id": i,
        "prompt": f"The mother tongue of {subject} is",
        "target_new": "English",
        "subject": subject,
        "ground_truth": "French",
        "rephrase_prompt": f"{subject} speaks",
        "locality_prompt": "The mother tongue of Other is",
        "locality_ground_truth": "French",
    }


def _write(root: Path, rel: str, obj) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


VAL_IDS = [5, 17, 10_003]


@pytest.fixture
def small_data(tmp_path, monkeypatch):
    """A data folder with only the local subsets (20 CounterFact records, 3 of them val ids)."""
    root = tmp_path / "data"
    _write(root, SUBSET, [_original(i) for i in range(20)])
    _write(root, VAL, [_reduced(i) for i in VAL_IDS])
    monkeypatch.setenv("PMET_DATA_DIR", str(root))
    monkeypatch.setenv("PMET_OFFLINE", "1")
    return root


@pytest.fixture
def full_data(small_data):
    """... plus a synthetic complete ``counterfact.json`` of 10,050 full-schema records."""
    _write(small_data, "counterfact.json", [_original(i) for i in range(10_050)])
    return small_data


def test_complete_counterfact_makes_the_pool_and_10000_edits(full_data):
    assert ex.resolve_n_edits("gptj", None, 1000) == 10_000  # the notebooks' n_edits=None on the paper's model
    assert ex.resolve_n_edits("neox", None, 1000) == 10_000
    records, pool = ex.table_selection("counterfact", ex.resolve_n_edits("gptj", None, 1000), seed=0)
    assert pool == "full" and len(records) == 10_000
    ids = {r.case_id for r in records}
    assert len(ids) == 10_000 and not ids & set(VAL_IDS) and all(r.full_fields for r in records)
    # present: also a small run uses it (and is kept apart in the cache: "_full" in the run folder)
    small, pool = ex.table_selection("counterfact", 10, seed=0)
    assert pool == "full" and [r.case_id for r in small] == [r.case_id for r in records[:10]]
    assert ex.table_selection("counterfact", 10, seed=0, full=False)[1] == "subset"
    from pmet.runcache import run_folder
    from pmet.runspec import RunSpec

    assert run_folder(RunSpec("gptj", "pmet", n_edits=10, pool="full"), "h", Path("r")).name.endswith("_full")
    assert run_folder(RunSpec("m", "pmet", n_edits=10), "h", Path("r")).name == "n10_seed0_hph"


def test_subset_pool_without_the_complete_file(small_data):
    records, pool = ex.table_selection("counterfact", 10, seed=0)
    assert pool == "subset" and len(records) == 10 and not {r.case_id for r in records} & set(VAL_IDS)


def test_missing_complete_file_is_one_clear_error(small_data):
    with pytest.raises(D.DataNotFoundError) as err:
        ex.table_records("counterfact", 10_000)  # more than the subset holds: needs counterfact.json
    msg = str(err.value)
    assert CF_URL in msg and "\n" not in msg
    with pytest.raises(D.DataNotFoundError, match="zsre_mem_eval.json"):
        ex.table_records("zsre", 5, full=True)  # the paper's models ask for the complete files


def test_missing_file_cli_error_has_no_traceback(small_data, capsys):
    from pmet.cli import main

    rc = main(
        [
            "run",
            "--model",
            "tiny-gptj",
            "--artifact",
            "table1",
            "--methods",
            "none",
            "--n-edits",
            "10000",
            "--no-generation",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("pmet: error: ") and CF_URL in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "--pool extended" in err  # the offline way to more CounterFact edits


def test_git_blob_checksum(tmp_path, monkeypatch):
    f = tmp_path / "x.json"
    f.write_bytes(b'[{"a": 1}]\n')
    if shutil.which("git"):
        expect = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True, check=True).stdout
        assert D.git_blob_sha1(f) == expect.strip()
    # a download whose git blob id differs is refused (and not left behind)
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setattr(
        D,
        "_download",
        lambda url, dest, *a, **k: (dest.parent.mkdir(parents=True, exist_ok=True), dest.write_text("[]")),
    )
    with pytest.raises(D.DataNotFoundError, match="wrong git blob id"):
        D.ensure_file("counterfact.json")
    assert not (tmp_path / "d" / "counterfact.json").exists()


def test_wikipedia_falls_back_to_wikitext_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    D._wikipedia_status.cache_clear()
    try:
        used, note = D.resolve_corpus("wikipedia")
        assert used == "wikitext" and "fallback" in note
        assert D.resolve_corpus("wikitext") == ("wikitext", "")
        from pmet.editing import hparams_for

        hp = hparams_for("pmet", "gptj", "counterfact")
        assert hp.mom2_corpus == "wikipedia" and ex._c0_fallback_id(hp) == "_c0wikitext"
    finally:
        D._wikipedia_status.cache_clear()


def test_plan_tiny_gptj(small_data):
    from pmet.plan import artifact_sizes, make_plan

    text = str(make_plan("tiny-gptj", "table1"))
    assert "tiny-gptj" in text and "hparams" in text and "pmet_tiny.json" in text and "ESTIMATE" in text
    assert "the local subset" in text and SUBSET in text
    assert artifact_sizes("table3", "gptj") == [1000, 5623, 10_000]
    assert artifact_sizes("fig3", "gptj")[-1] == 10_000 and artifact_sizes("table1", "tiny-gptj") == [1000]


def test_plan_paper_model_lists_missing_data(small_data, capsys):
    from pmet.cli import main

    assert main(["plan", "--model", "gptj", "--artifact", "table2"]) == 0
    out = capsys.readouterr().out
    assert "zsre_mem_eval.json: MISSING" in out and "8546c90abc10b77ebc9fd69de178cf7837ff86dc" in out
    assert "pmet_gptj_zsre.json" in out and "6,053,381,344 parameters" in out and "ESTIMATE" in out


def test_plan_sees_present_complete_file(full_data):
    from pmet.plan import make_plan

    text = str(make_plan("gptj", "table1"))
    assert "counterfact.json: present" in text and "minus counterfact-val ids" in text


def test_plan_with_the_extended_pool(small_data, capsys):
    """Offline, a CounterFact plan beyond the subset points at ``--pool extended``; with it the plan lists the
    reduced records' file and estimates generation for the full-field records only."""
    from pmet.cli import main
    from pmet.plan import make_plan

    auto = make_plan("smollm2", "table1", n_edits=10_000, methods=["pmet"])
    assert "offline, --pool extended runs 10,000" in str(auto)
    assert main(["plan", "--artifact", "table1", "--n-edits", "10000", "--methods", "pmet", "--pool", "extended"]) == 0
    out = capsys.readouterr().out
    assert "extended: the 1590 full-field records, then 8,410 reduced" in out and "counterfact-edit.json" in out
    ext = make_plan("smollm2", "table1", n_edits=10_000, methods=["pmet"], pool="extended")
    assert ext.estimate["eval_cpu_hours"] < auto.estimate["eval_cpu_hours"] / 2  # no generation on 8,410 of them
    with pytest.raises(ValueError, match="CounterFact"):
        make_plan("smollm2", "table2", n_edits=100, pool="extended")


def test_plan_counts_each_editors_values_once():
    """A sweep's smaller runs edit a prefix of its largest run and reuse its values: the values estimate of
    Fig. 3 to 10,000 equals that of one 10,000-edit run; bf16 values use the benchmark's (faster) bf16 rate."""
    from pmet.plan import make_plan

    one = make_plan("smollm2", "table1", n_edits=10_000, methods=["pmet"], pool="extended")
    sweep = make_plan("smollm2", "fig3", n_edits=10_000, methods=["pmet"], pool="extended")
    assert sweep.estimate["values_cpu_hours"] == pytest.approx(one.estimate["values_cpu_hours"])
    bf16 = make_plan("smollm2", "table1", n_edits=10_000, methods=["pmet"], pool="extended", value_autocast="bfloat16")
    assert bf16.estimate["values_cpu_hours"] < one.estimate["values_cpu_hours"] / 2
    assert "bf16 rate" in str(bf16) and "float32 rate" in str(one)


def test_plan_counts_shared_values_once():
    """PMET's "w/ W_O^MHSA" and "even spread" variants optimise PMET's values (they differ after Eq. 10), so
    Table 3's plan counts three value optimisations' worth of values less than its four editors' naive sum;
    "w/o δ^a" and MEMIT optimise their own."""
    from pmet.plan import make_plan, value_groups

    groups = value_groups(
        ["none", "pmet", "pmet-no-attn-delta", "pmet-with-attn-weights", "pmet-even-spread"], "smollm2", "counterfact"
    )
    assert sorted(groups) == [("pmet", "pmet-with-attn-weights", "pmet-even-spread"), ("pmet-no-attn-delta",)]
    assert value_groups(["memit", "pmet", "rome"], "smollm2", "counterfact") == [("memit",), ("pmet",), ("rome",)]
    t3 = make_plan("smollm2", "table3", n_edits=1000)
    one = make_plan("smollm2", "table1", n_edits=1000, methods=["pmet"])
    assert t3.estimate["values_cpu_hours"] == pytest.approx(2 * one.estimate["values_cpu_hours"])
    assert "counted once" in str(t3) and "2 value optimisation(s)" in str(t3)
