"""Tests for pmet.data (loaders, validation, missing-file errors)."""

from __future__ import annotations

import hashlib
import json
import urllib.error
from pathlib import Path

import pytest

from pmet import data as D
from pmet.paths import cache_dir, data_dir, fixtures_data_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
REAL_DOWNLOAD = D._download

# What each data folder holds: "full" is the complete shared data (SOURCES.md), "fixtures" the committed cut of
# it (tests/fixtures/data, PROVENANCE.md). The loader tests run on both; "full" skips when it is absent.
EXPECT = {
    "full": dict(
        full=1653,
        splits={"edit": 10000, "train": 10000, "val": 1919},
        all=21919,
        edit_full=1298,
        val_full=63,
        zsre_eval=1037,
        zsre_train=998,
        zsre_invalid=[534, 723],
        known=1209,
        min_paras=5000,
    ),
    "fixtures": dict(
        full=40,
        splits={"edit": 32, "train": 16, "val": 16},
        all=64,
        edit_full=24,
        val_full=8,
        zsre_eval=24,
        zsre_train=24,
        zsre_invalid=[24],
        known=48,
        min_paras=200,
    ),
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: a download attempt fails immediately."""

    def fail(url, *args, **kwargs):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(D, "_download", fail)


@pytest.fixture(params=["fixtures", "full"])
def shared(request, monkeypatch):
    """A data folder as PMET_DATA_DIR and what it holds: the committed fixtures, or the complete shared data
    (skipped when absent, see conftest.full_data)."""
    if request.param == "full":
        root = request.getfixturevalue("full_data")
    else:
        root = FIXTURES
        monkeypatch.setenv("PMET_DATA_DIR", str(root))
    return root, EXPECT[request.param]


def _write(root: Path, rel: str, obj) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _original(
    case_id=7, prompt="The mother tongue of {} is", subject="Danielle Darrieux", new="English", true="French"
):
    return {
        "case_id": case_id,
        "pararel_idx": 1,
        "requested_rewrite": {
            "prompt": prompt,
            "relation_id": "P103",
            "subject": subject,
            "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"},
        },
        "paraphrase_prompts": ["a", "b"],
        "neighborhood_prompts": ["n"] * 10,
        "attribute_prompts": ["t"] * 10,
        "generation_prompts": ["g"] * 10,
    }


def _reduced(case_id=8, prompt="Toko Yasuda, the", subject="Toko Yasuda", new="piano"):
    return {
        "case_id": case_id,
        "prompt": prompt,
        "target_new": new,
        "subject": subject,
        "ground_truth": "guitar",
        "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the",
        "locality_ground_truth": "guitar",
    }


# ------------------------------------------------------------------ paths
def test_paths_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("PMET_CACHE_DIR", str(tmp_path / "c"))
    assert data_dir() == tmp_path / "d"
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_default_data_dir_is_shared(monkeypatch):
    from pmet.paths import REPO_ROOT

    beside = REPO_ROOT.parent / "shared" / "data"
    if not beside.is_dir():
        pytest.skip(f"no shared data folder beside the checkout ({beside})")
    monkeypatch.delenv("PMET_DATA_DIR", raising=False)
    assert data_dir() == beside


def test_tests_and_ci_read_the_fixtures(monkeypatch):
    """conftest points PMET_DATA_DIR at the committed fixtures; the notebooks' CI configuration does too."""
    from pmet.notebook import configure

    assert data_dir() == FIXTURES == fixtures_data_dir() and D.is_fixture_folder(FIXTURES)
    monkeypatch.setenv("PMET_NOTEBOOK_SMALL", "1")
    assert configure({"data_dir": None}, small={}).data_dir == str(FIXTURES)
    assert configure({"data_dir": "/elsewhere"}, small={}).data_dir == "/elsewhere"  # given: kept
    monkeypatch.delenv("PMET_NOTEBOOK_SMALL")
    assert configure({"data_dir": None, "out_dir": "."}).data_dir is None


# ------------------------------------------------------------- real data
def test_counterfact_counts(shared):
    root, n = shared
    assert len(D.load_counterfact("full")) == n["full"]
    sizes = {s: len(D.load_counterfact(s)) for s in ("edit", "train", "val")}
    assert sizes == n["splits"]
    everything = D.load_counterfact("all")
    ids = [r.case_id for r in everything]
    assert len(everything) == n["all"] and ids == sorted(set(ids))
    if n["all"] == 21919:
        assert ids == list(range(21919))
    assert sum(r.full_fields for r in everything) == n["full"]
    split_ids = [{r.case_id for r in D.load_counterfact(s)} for s in ("edit", "train", "val")]
    assert set().union(*split_ids) == set(ids) and sum(map(len, split_ids)) == len(ids)  # disjoint splits


def test_counterfact_full_fields_only(shared):
    root, n = shared
    assert len(D.load_counterfact("all", full_fields_only=True)) == n["full"]
    edit_full = D.load_counterfact("edit", full_fields_only=True)
    assert len(edit_full) == n["edit_full"] and all(r.full_fields for r in edit_full)
    assert len(D.load_counterfact("val", full_fields_only=True)) == n["val_full"]
    assert all(not r.full_fields for r in D.load_counterfact("val", limit=5))
    assert len(D.load_counterfact("full", limit=3)) == 3


def test_table_pool_leaves_out_val(shared):
    """Tables edit full-schema records whose case_id is not in the val split (tuning data)."""
    from pmet.experiments import table_records

    root, n = shared
    val_ids = {r.case_id for r in D.load_counterfact("val")}
    pool = table_records("counterfact")
    assert len(pool) == n["full"] - n["val_full"] and not val_ids & {r.case_id for r in pool}
    assert all(r.full_fields for r in pool)
    assert table_records("counterfact", 4) == table_records("counterfact", 4)  # seeded
    if n["all"] < 100:  # the reduced edit records extend the pool only when asked (cheap on the fixtures only)
        wide = table_records("counterfact", full_fields_only=False)
        full_ids = {r.case_id for r in D.load_counterfact("full")}
        assert len(wide) == len(pool) + sum(r.case_id not in full_ids for r in D.load_counterfact("edit"))
        assert not val_ids & {r.case_id for r in wide}
        with pytest.raises(ValueError, match="only"):
            table_records("counterfact", len(wide) + 1, full_fields_only=False)


def test_danielle_darrieux(shared):
    full = D.load_counterfact("full")[0]
    assert (full.case_id, full.subject, full.prompt) == (0, "Danielle Darrieux", "The mother tongue of {} is")
    assert (full.target_new, full.target_true, full.relation_id) == ("English", "French", "P103")
    assert (full.target_new_id, full.target_true_id) == ("Q1860", "Q150")
    assert full.full_fields and len(full.paraphrase_prompts) == 2
    assert len(full.neighborhood_prompts) == len(full.attribute_prompts) == len(full.generation_prompts) == 10
    assert full.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert full.as_request() == {
        "case_id": 0,
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "target_true": "French",
    }
    reduced = D.load_counterfact("edit")[0]
    assert not reduced.full_fields and reduced.relation_id is None
    assert reduced.as_request() == full.as_request()
    assert reduced.neighborhood_prompts == ("Michel Rocard is a native speaker of",)
    assert reduced.neighborhood_target == "French"
    assert D.load_counterfact("all")[0] == full
    D.validate_request(full.as_request())


def test_records_are_immutable_and_fresh(shared):
    root, n = shared
    a = D.load_counterfact("full")
    a.clear()
    assert len(D.load_counterfact("full")) == n["full"]
    with pytest.raises(AttributeError):
        D.load_counterfact("full")[0].subject = "x"  # type: ignore[misc]


def test_zsre(shared, caplog):
    root, n = shared
    ev = D.load_zsre("eval")
    assert len(ev) == n["zsre_eval"] and [r.case_id for r in ev] == list(range(n["zsre_eval"]))
    r = ev[0]
    assert r.subject == "IAAF Combined Events Challenge" and r.answer == "2006"
    assert r.true_answers == ("1998",) and r.loc.startswith("nq question: ")
    assert r.as_request() == {
        "case_id": 0,
        "prompt": "When was the inception of {}?",
        "subject": r.subject,
        "target_new": "1998",
        "target_true": None,
    }
    assert r.as_request("alt")["target_new"] == "2006"
    for rec in ev:
        D.validate_request(rec.as_request())
        assert rec.prompt.format(rec.subject) == rec.src and rec.answer == rec.answer.strip()
    train = D.load_zsre("train")
    bad = n["zsre_invalid"]
    assert len(train) == n["zsre_train"] and f"skipped {len(bad)} invalid" in caplog.text
    assert not set(bad) & {r.case_id for r in train}
    with pytest.raises(D.InvalidRecordError, match=f"case_id={bad[0]}"):
        D.load_zsre("train", strict=True)
    assert len(D.load_zsre("eval", limit=10)) == 10


def test_known_facts(shared):
    root, n = shared
    facts = D.load_known_facts()
    assert len(facts) == n["known"] and [f.known_id for f in facts] == list(range(n["known"]))
    f = facts[0]
    assert (f.subject, f.attribute, f.relation_id) == ("Vinson Massif", "Antarctica", "P30")
    assert all(x.prompt.startswith(x.template.format(x.subject)) for x in facts)


def test_text_corpus(shared):
    root, n = shared
    paras = D.load_text_corpus("wikitext")
    assert len(paras) > n["min_paras"] and all(p and p == p.strip() for p in paras)
    assert not any(p.startswith("= ") and p.endswith(" =") for p in paras)
    assert paras[0].startswith("Senjō no Valkyria 3")
    assert any("<unk>" in p for p in paras)
    assert not any("<unk>" in p for p in D.load_text_corpus(drop_unk=True))
    cut = D.load_text_corpus(max_chars=1000)
    assert sum(map(len, cut)) == 1000 and cut[0] == paras[0]
    cid = D.corpus_id("wikitext")
    assert cid == D.corpus_id("wikitext") and len(cid) == 12
    assert cid != D.corpus_id("wikitext-2-raw")
    head = (root / D.CORPORA["wikitext-103-train-head"][0]).read_text(encoding="utf-8")
    assert not head.endswith("\n") and head.rsplit("\n", 1)[1].strip() not in paras  # cut line dropped


def test_sha256_of_shared_files(full_data):
    for rel, known in D.KNOWN_FILES.items():
        if (full_data / rel).is_file() and known.sha256:
            D.ensure_file(rel, verify=True)


def test_fixtures_skip_the_full_checksums(tmp_path):
    """The fixture files are cuts, so the full files' recorded sha256 are not checked in a FIXTURES folder; the
    same file in an ordinary folder fails the check."""
    rel = "known_1000.json"
    assert D.ensure_file(rel, FIXTURES, verify=True) == FIXTURES / rel
    plain = tmp_path / rel
    plain.write_bytes((FIXTURES / rel).read_bytes())
    with pytest.raises(D.DataIntegrityError, match="known_1000.json.*is corrupt"):
        D.ensure_file(rel, tmp_path, verify=True)


def test_fixture_provenance_matches_files():
    """PROVENANCE.md lists every fixture data file with its current size and sha256."""
    text = (FIXTURES / "PROVENANCE.md").read_text(encoding="utf-8")
    files = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.name not in ("PROVENANCE.md", "FIXTURES"))
    assert files
    for p in files:
        data = p.read_bytes()
        rel = p.relative_to(FIXTURES).as_posix()
        assert rel in D.KNOWN_FILES, rel  # the layout mirrors the shared folder
        assert f"| {len(data):,} | `{hashlib.sha256(data).hexdigest()}` |" in text, rel


def test_fixtures_regenerate_identically(full_data, tmp_path):
    """make_fixtures.py cuts the committed fixtures from the full data, byte for byte."""
    import runpy

    mod = runpy.run_path(str(FIXTURES.parent / "make_fixtures.py"))
    mod["main"](["--source", str(full_data), "--out", str(tmp_path)])
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    have = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file())
    assert made == have
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (FIXTURES / rel).read_bytes(), rel


def test_as_dataset(shared):
    ds = D.as_dataset(D.load_counterfact("full", limit=4))
    assert ds.num_rows == 4 and ds[0]["subject"] == "Danielle Darrieux"


# --------------------------------------------------- validation / errors
def test_validate_request():
    ok = {"case_id": 3, "prompt": "{} plays", "subject": "Ann", "target_new": " piano"}
    D.validate_request(ok)
    D.validate_request({**ok, "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}})
    bad = [
        ({"prompt": "plays"}, "exactly one"),
        ({"prompt": "{} and {}"}, "exactly one"),
        ({"prompt": "{} {x}"}, "stray braces"),
        ({"subject": "  "}, "subject is empty"),
        ({"target_new": " "}, "target_new"),
        ({"target_true": 5}, "target_true"),
    ]
    for change, msg in bad:
        with pytest.raises(D.InvalidRecordError, match=f"case_id=3.*{msg}"):
            D.validate_request({**ok, **change})
    with pytest.raises(D.InvalidRecordError, match="missing key 'subject'"):
        D.validate_request({"prompt": "{} x", "target_new": "y"})


@pytest.mark.parametrize(
    "record, msg",
    [
        (_original(case_id=41, prompt="no placeholder"), "case_id=41.*exactly one"),
        (_original(case_id=42, subject=""), "case_id=42.*subject"),
        (_original(case_id=43, new="  "), "case_id=43.*target_new"),
    ],
)
def test_invalid_original_record(tmp_path, monkeypatch, record, msg):
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path))
    _write(tmp_path, "counterfact/counterfact_subset_merged.json", [_original(), record])
    with pytest.raises(D.InvalidRecordError, match=msg):
        D.load_counterfact("full")


def test_invalid_reduced_record(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path))
    rel = "counterfact/easyedit_mend_format/counterfact-val.json"
    _write(tmp_path, rel, [_reduced(), _reduced(case_id=99, subject="Nobody")])
    with pytest.raises(D.InvalidRecordError, match="case_id=99.*does not occur"):
        D.load_counterfact("val")
    _write(tmp_path, rel, [_reduced(), _reduced(case_id=98, prompt="Toko Yasuda {x}")])
    with pytest.raises(D.InvalidRecordError, match="case_id=98"):
        D.load_counterfact("val")
    _write(tmp_path, rel, [_reduced()])
    (rec,) = D.load_counterfact("val")
    assert rec.prompt == "{}, the" and rec.paraphrase_prompts == ("Toko Yasuda is incredible at",)


def test_all_merges_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path))
    _write(tmp_path, "counterfact/counterfact_subset_merged.json", [_original(case_id=1)])
    _write(tmp_path, "counterfact/easyedit_mend_format/counterfact-edit.json", [_reduced(case_id=1)])
    _write(tmp_path, "counterfact/easyedit_mend_format/counterfact-train.json", [_reduced(case_id=2)])
    _write(tmp_path, "counterfact/easyedit_mend_format/counterfact-val.json", [_reduced(case_id=0)])
    recs = D.load_counterfact("all")
    assert [(r.case_id, r.full_fields) for r in recs] == [(0, False), (1, True), (2, False)]


def test_invalid_zsre_record(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path))
    good = {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": " drones",
        "answers": ["uniform"],
        "loc": "nq question: x",
        "loc_ans": "y",
        "cond": "c",
    }
    _write(tmp_path, "zsre/zsre_mend_eval_portability_gpt4.json", [good, {**good, "subject": "Acme"}])
    recs = D.load_zsre("eval")
    assert [r.case_id for r in recs] == [0] and recs[0].answer == "drones"
    assert "skipped 1 invalid" in caplog.text
    with pytest.raises(D.InvalidRecordError, match="case_id=1.*does not occur"):
        D.load_zsre("eval", strict=True)


def test_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path))
    with pytest.raises(D.DataNotFoundError) as info:
        D.load_known_facts()
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "known_1000.json" in msg and str(tmp_path / "known_1000.json") in msg
    assert "https://rome.baulab.info/data/dsets/known_1000.json" in msg
    assert "PMET_DATA_DIR" in msg and "URLError" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_file_offline_and_unhosted(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PMET_OFFLINE", "1")
    with pytest.raises(D.DataNotFoundError, match="downloads are disabled"):
        D.load_zsre()
    with pytest.raises(D.DataNotFoundError, match="no public download URL"):
        D.load_counterfact("full")
    with pytest.raises(D.DataNotFoundError, match="not a known data file"):
        D.ensure_file("nope.json")


def test_download_success_is_atomic(tmp_path, monkeypatch):
    """A real (local file://) download goes through _download, truncation and sha check."""
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello world\n")
    sha = hashlib.sha256(b"hello").hexdigest()
    monkeypatch.setattr(D, "_download", REAL_DOWNLOAD)  # file:// URL: no network involved
    monkeypatch.setitem(D.KNOWN_FILES, "x/h.txt", D.RemoteFile(src.as_uri(), sha, max_bytes=5))
    out = D.ensure_file("x/h.txt", tmp_path / "data")
    assert out.read_bytes() == b"hello" and list(out.parent.iterdir()) == [out]
    monkeypatch.setitem(D.KNOWN_FILES, "x/bad.txt", D.RemoteFile(src.as_uri(), sha))
    with pytest.raises(D.DataNotFoundError, match="wrong sha256"):
        D.ensure_file("x/bad.txt", tmp_path / "data")
    assert not (tmp_path / "data" / "x" / "bad.txt").exists()
