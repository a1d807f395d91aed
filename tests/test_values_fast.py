"""The value optimisation's fast path (``v_fast``, bf16 block copies) against the float32 reference, on tiny models.

The reference numbers below were printed by the code *before* the fast path existed (commit 9ea3e31):
the float32 path must keep computing them (the committed float32 tables and cached values depend on it).
"""

from dataclasses import replace

import pytest
import torch

from pmet.editing import EditHparams, compute_values, edit, load_hparams, normalize_requests
from pmet.editing.context import flatten, get_context_templates
from pmet.editing.partial_forward import attention_implementation, low_precision_blocks
from pmet.editing.tokens import build_value_batch, pad_id_of, split_at_subject
from pmet.editing.value_cache import value_cache_key
from pmet.editing.values import optimize_batch

REQS = [
    {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "Paris"},
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "basketball"},
]
# tiny-llama, critical layers of the model, 6 steps, both requests in one batch: values[:, :4] and row norms
BEFORE = {
    ("pmet", "mlp"): (
        [-0.003873, 0.059496, -0.043172, -0.036398, -0.010222, 0.007509, 0.039982, 0.027457],
        [0.28838, 0.26444],
    ),
    ("pmet", "attn"): (
        [-0.038411, -0.046192, -0.15849, -0.157318, -0.089665, 0.024239, 0.053861, 0.135044],
        [1.03266, 1.22331],
    ),
    ("memit", "block"): (
        [-0.05084, -0.074047, -0.289215, -0.379893, -0.199938, -0.14861, 0.110201, 0.451727],
        [2.07443, 2.45202],
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(tiny_models, name="tiny-llama"):
    model, tok = tiny_models[name]
    reqs = normalize_requests(REQS, tok)
    flat, _ = flatten(get_context_templates(model, tok))
    return model, tok, reqs, flat, max(model.layout.critical_layers)


@pytest.mark.parametrize("method", ["pmet", "memit"])
def test_float32_reference_values_unchanged(tiny_models, tmp_cache, method):
    model, tok, reqs, flat, L = _setup(tiny_models)
    hp = load_hparams(method, model, v_num_grad_steps=6, v_batch_size=2)
    assert not hp.v_fast and hp.v_autocast is None  # the reference stays the default
    v, _ = compute_values(model, tok, reqs, hp, flat, L, use_cache=False, progress=False)
    for (m, name), (head, norms) in BEFORE.items():
        if m == method:
            assert torch.allclose(v[name][:, :4].flatten(), torch.tensor(head), rtol=1e-4, atol=2e-6), name
            assert torch.allclose(v[name].norm(dim=1), torch.tensor(norms), rtol=1e-4), name


def test_bf16_block_copies_compute_what_autocast_computes(tiny_models):
    """Casting blocks L..end once gives bit for bit what autocast's per-use casts give (so cached bf16 values
    stay valid)."""
    model, tok, reqs, flat, L = _setup(tiny_models)
    hp = load_hparams("pmet", model, v_num_grad_steps=4, v_batch_size=2, v_autocast="bfloat16")
    with attention_implementation(model, "eager"):
        per_use, _ = optimize_batch(model, tok, reqs, hp, flat, L, blocks=None)
        once, _ = optimize_batch(model, tok, reqs, hp, flat, L, blocks=low_precision_blocks(model, L, torch.bfloat16))
    assert all(torch.equal(per_use[n], once[n]) for n in per_use)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched


def test_split_at_subject_keeps_the_tokens(tiny_models):
    model, tok, reqs, flat, L = _setup(tiny_models)
    bt = build_value_batch(tok, reqs, flat, "{} is a", "cpu")
    sp = split_at_subject(bt, pad_id_of(tok))
    for i in range(bt.input_ids.shape[0]):
        pre = sp.prefix_ids[i][sp.prefix_mask[i].bool()].tolist()
        suf = sp.suffix.input_ids[i][sp.suffix.attention_mask[i].bool()].tolist()
        row = bt.input_ids[i][bt.attention_mask[i].bool()].tolist()
        assert len(pre) == int(bt.lookup[i]) and suf[0] == row[len(pre)]
        assert pre + suf == (row[: len(pre) + 1] if i in bt.kl_rows.tolist() else row)
    # every target is read at the same token
    assert torch.equal(sp.suffix.input_ids[bt.t_rows, sp.suffix.t_pos], bt.input_ids[bt.t_rows, bt.t_pos])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_fast_values_match_float32_in_float32(tiny_models, name):
    """v_fast alone (no bf16) changes only rounding: the same values to float32 noise, with an early stop."""
    model, tok, reqs, flat, L = _setup(tiny_models, name)
    hp = load_hparams("memit", model, v_num_grad_steps=10, v_batch_size=2)
    ref, ri = compute_values(model, tok, reqs, hp, flat, L, use_cache=False, progress=False)
    hp = replace(hp, loss_stop=(ri[0]["loss"] + ri[1]["loss"]) / 2)  # one request stops early, one runs on
    ref, ri = compute_values(model, tok, reqs, hp, flat, L, use_cache=False, progress=False)
    fast, fi = compute_values(model, tok, reqs, replace(hp, v_fast=True), flat, L, use_cache=False, progress=False)
    assert [i["steps"] for i in fi] == [i["steps"] for i in ri] and len({i["steps"] for i in ri}) == 2
    for n in ref:
        assert torch.allclose(fast[n], ref[n], rtol=1e-4, atol=1e-5), n


@pytest.mark.parametrize("method", ["pmet", "memit"])
def test_fast_edit_makes_the_same_target_top(tiny_models, tmp_cache, method):
    model, tok = tiny_models["tiny-llama"]
    req = REQS[0]
    prompt = req["prompt"].format(req["subject"])
    target = tok(" " + req["target_new"], add_special_tokens=False)["input_ids"][0]
    tops = {}
    for fast in (False, True):
        kw = dict(v_fast=True, v_autocast="bfloat16") if fast else {}
        result = edit(model, tok, [req], method=method, progress=False, hparams=load_hparams(method, model, **kw))
        try:
            with torch.no_grad():
                tops[fast] = int(model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax())
        finally:
            result.restore()
    assert tops[False] == tops[True] == target


def test_fast_option_is_in_the_cache_key_only_when_set():
    hp = EditHparams(layers=(1, 2))
    req = {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": " Paris"}
    mid = {"fingerprint": "f", "weights": "w"}
    # keys printed by the code before v_fast existed: existing caches stay valid
    assert value_cache_key(mid, hp, 2, ["{}", "A. {}"], req) == "f382c3e0d886eb536047e0640551263c"
    assert value_cache_key(mid, hp.with_method("memit"), 2, ["{}"], req) == "444dcc1b02a90a9627c7a7443956d6d3"
    keys = {
        value_cache_key(mid, replace(hp, **kw), 2, ["{}"], req)
        for kw in ({}, {"v_fast": True}, {"v_autocast": "bfloat16"}, {"v_autocast": "bfloat16", "v_fast": True})
    }
    assert len(keys) == 4
    assert "v_fast" not in hp.to_dict() and replace(hp, v_fast=True).to_dict()["v_fast"] is True
    with pytest.raises(ValueError, match="v_fast"):
        replace(hp, v_fast="yes")


def test_low_precision_warns_only_where_the_cpu_lacks_its_matrix_units(tiny_models, tmp_cache, monkeypatch):
    """bf16 products on a CPU without bf16 units fall back to PyTorch's reference kernel (17x slower than
    float32 on an AVX2 machine: benchmarks/results/bf16_gemm.json): bf16 value vectors there warn, with the fix."""
    import warnings

    import pmet.models
    from pmet.models import SlowPrecisionWarning, fast_low_precision

    model, tok, reqs, flat, L = _setup(tiny_models)
    hp = load_hparams("memit", model, v_num_grad_steps=1, v_batch_size=2, v_autocast="bfloat16")
    monkeypatch.setattr(pmet.models, "_mkldnn_supports", lambda dtype: False)
    assert not fast_low_precision("cpu", "bfloat16") and fast_low_precision("cpu", torch.float32)
    assert fast_low_precision("cuda", torch.bfloat16) and fast_low_precision("meta", "float16")
    with pytest.warns(SlowPrecisionWarning, match="value_autocast=None"):
        compute_values(model, tok, reqs, hp, flat, L, use_cache=False, progress=False)
    monkeypatch.setattr(pmet.models, "_mkldnn_supports", lambda dtype: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPrecisionWarning)
        compute_values(model, tok, reqs, hp, flat, L, use_cache=False, progress=False)
        monkeypatch.setattr(pmet.models, "_mkldnn_supports", lambda dtype: False)
        compute_values(model, tok, reqs, replace(hp, v_autocast=None), flat, L, use_cache=False, progress=False)
