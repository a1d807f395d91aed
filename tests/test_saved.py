"""Saved edits (pmet.editing.saved) on the tiny random models: save / load / apply is bit-exact against the
model right after ``edit``, ``restore`` gives the original bit for bit, wrong models and changed files are
refused."""

import json

import pytest
import torch
from helpers import params_of
from safetensors.torch import load_file, save_file

from pmet import SavedEditError, edit, load_edit, load_model, save_edited_model
from pmet.editing.saved import MANIFEST, MODEL_MANIFEST, WEIGHTS

REQ = {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "Paris"}
REQ2 = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "basketball"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _same(model, params) -> bool:
    return all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def _edited(tmp_path, name="tiny-llama", method="pmet", dtype=None, **kw):
    """A fresh model, edited and saved; returns (model, tok, result, params before, params after, folder)."""
    model, tok = load_model(name)
    if dtype is not None:
        model.to(dtype)
    before = params_of(model)
    result = edit(model, tok, [REQ], method=method, progress=False, **kw)
    after = params_of(model)
    folder = result.save(tmp_path / "edit")
    return model, tok, result, before, after, folder


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gptj", "tiny-gpt2"])  # Linear, Linear+bias, Conv1D
def test_round_trip_is_bit_exact_and_restores(tmp_cache, tmp_path, name):
    model, tok, result, before, after, folder = _edited(tmp_path, name)
    assert not _same(model, before)
    result.restore()
    assert _same(model, before)

    saved = load_edit(folder)
    m = saved.manifest
    assert m["method"] == "pmet" and m["requests"][0]["subject"] == REQ["subject"]
    assert set(m["weights"]) == set(result.deltas) and m["c0"]["stats_sha256"].keys() == result.deltas.keys()
    assert m["layers"] == list(result.layers)

    other, _ = load_model(name)  # another instance of the same model, as in another process
    applied = saved.apply(other)
    assert _same(other, after)  # bit for bit the model right after edit
    assert applied.hparams == result.hparams and applied.requests == result.requests
    for w, delta in result.deltas.items():  # Δ read back as W1 - W0 differs only by the float32 rounding
        torch.testing.assert_close(applied.deltas[w], delta, rtol=0, atol=1e-6)
    with pytest.raises(SavedEditError, match="already applied"):
        saved.apply(other)
    applied.restore()
    assert _same(other, before)


def test_bfloat16_round_trip(tmp_cache, tmp_path):
    from pmet.editing.ft import FTHparams  # FT-W runs on bfloat16 weights (the shared editor works in float32)

    hp = FTHparams(layers=(2,), num_steps=3, lr=1e-2)
    model, tok, result, before, after, folder = _edited(tmp_path, method="ft", hparams=hp, dtype=torch.bfloat16)
    result.restore()
    saved = load_edit(folder)
    assert {s["dtype"] for s in saved.manifest["weights"].values()} == {"bfloat16"}
    applied = saved.apply(model)
    assert _same(model, after)
    applied.restore()
    assert _same(model, before)
    model32, _ = load_model("tiny-llama")  # same weights in float32: not the edited weights' dtype
    with pytest.raises(SavedEditError, match="bfloat16"):
        saved.apply(model32)


@pytest.mark.parametrize("method", ["ft", "rome"])
def test_a_baseline_round_trip(tmp_cache, tmp_path, method):
    from pmet.editing.ft import FTHparams
    from pmet.editing.rome import RomeHparams

    hp = (
        FTHparams(layers=(2,), num_steps=3, lr=1e-2, norm_constraint=2e-3)
        if method == "ft"
        else RomeHparams(layer=1, v_num_grad_steps=5, mom2_n_tokens=1000)
    )
    model, tok = load_model("tiny-gptj")
    before = params_of(model)
    result = edit(model, tok, [REQ, REQ2], method=method, hparams=hp, progress=False)  # ROME: one after another
    after = params_of(model)
    folder = result.save(tmp_path / "edit")
    result.restore()
    saved = load_edit(folder)
    assert (saved.manifest["c0"] is None) == (method == "ft")  # FT-W uses no key statistics
    applied = saved.apply(model)
    assert _same(model, after) and applied.hparams == hp
    applied.restore()
    assert _same(model, before)


def test_wrong_models_are_refused(tmp_cache, tmp_path):
    model, tok, result, before, after, folder = _edited(tmp_path)
    result.restore()
    saved = load_edit(folder)
    reseeded, _ = load_model("tiny-llama", seed=1)
    with pytest.raises(SavedEditError, match="fingerprint"):
        saved.apply(reseeded)
    gptj, _ = load_model("tiny-gptj")
    with pytest.raises(SavedEditError, match="does not have"):
        saved.apply(gptj)
    # the same model with one edited weight changed where the fingerprint does not look
    name = next(iter(saved.manifest["weights"]))
    with torch.no_grad():
        model.get_parameter(name).view(-1)[-1] += 1e-3
    with pytest.raises(SavedEditError, match="not the weight the edit was made on"):
        saved.apply(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n != name)  # nothing written


def test_changed_files_are_detected(tmp_cache, tmp_path):
    model, tok, result, before, after, folder = _edited(tmp_path)
    result.restore()
    load_edit(folder)  # intact
    wpath, mpath = folder / WEIGHTS, folder / MANIFEST
    good_weights, good_manifest = wpath.read_bytes(), mpath.read_text()

    from safetensors import safe_open

    with safe_open(str(wpath), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(wpath))
    name = next(iter(tensors))
    tensors[name].view(-1)[0] += 1e-6
    save_file(tensors, str(wpath), metadata=meta)
    with pytest.raises(SavedEditError, match="checksum"):
        load_edit(folder)

    wpath.write_bytes(good_weights)
    manifest = json.loads(good_manifest)
    manifest["requests"][0]["target_new"] = " London"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(SavedEditError, match="does not match"):
        load_edit(folder)

    mpath.write_text(json.dumps(json.loads(good_manifest), indent=4))  # reformatted, same content: fine
    load_edit(folder).apply(model).restore()
    assert _same(model, before)
    with pytest.raises(SavedEditError, match="not a saved edit"):
        load_edit(tmp_path / "nowhere")


def test_save_refuses_a_restored_or_further_edited_result(tmp_cache, tmp_path):
    model, tok = load_model("tiny-llama")
    first = edit(model, tok, [REQ], method="memit", progress=False)
    second = edit(model, tok, [REQ2], method="memit", progress=False)  # on top of the first
    with pytest.raises(SavedEditError, match="no longer equals"):
        first.save(tmp_path / "a")
    second.save(tmp_path / "b")  # the last edit is what the model carries now
    second.restore()
    first.restore()
    with pytest.raises(SavedEditError, match="restored"):
        first.save(tmp_path / "c")
    assert not (tmp_path / "a" / MANIFEST).exists()


def test_save_edited_model_reloads_bit_exact(tmp_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load_model("tiny-llama")
    result = edit(model, tok, [REQ], method="pmet", progress=False)
    folder = save_edited_model(model, tok, tmp_path / "model", edit=result)
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    state = reloaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    carried = json.loads((folder / MODEL_MANIFEST).read_text())
    assert set(carried["weights"]) == set(result.deltas) and carried["method"] == "pmet"
    result.restore()


def test_cli_edit_save(tmp_cache, tmp_path, capsys):
    from pmet.cli import main

    rc = main(
        [
            "edit",
            "--model",
            "tiny-llama",
            "--prompt",
            REQ["prompt"],
            "--target",
            "Paris",
            "--device",
            "cpu",
            "--save",
            str(tmp_path / "e"),
        ]
    )
    assert rc == 0 and "saved the edit" in capsys.readouterr().out
    model, _ = load_model("tiny-llama")
    before = params_of(model)
    applied = load_edit(tmp_path / "e").apply(model)
    assert not _same(model, before)
    applied.restore()
    assert _same(model, before)
