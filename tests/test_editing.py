"""Editor tests on the tiny random models (fast).

The tiny models are random, so an edit can only be observed where the subject's last token is the
position that predicts the target (prompt ``"... of {}"``): only one block follows the last critical layer
and random attention barely carries information between positions.
"""

import math
from dataclasses import replace

import pytest
import torch
from helpers import params_of

from pmet.data import InvalidRecordError
from pmet.editing import (
    METHODS,
    EditHparams,
    compute_keys,
    compute_values,
    edit,
    forward_from_layer,
    hparams_path,
    load_hparams,
    normalize_requests,
    solve_update,
    spread_residual,
)
from pmet.editing.context import flatten, get_context_templates
from pmet.editing.partial_forward import block_input
from pmet.editing.tokens import pad_id_of, pad_right

REQ = {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "Paris"}
REQS = [
    REQ,
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "basketball"},
    {"prompt": "The capital of {} is", "subject": "Italy", "target_new": " London"},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def _top(model, tok, text):
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return int(model(**enc).logits[0, -1].argmax())


# ---------------------------------------------------------------------------------------------- pure math
def test_solve_update_normal_equations():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, n = 7, 11, 3
    R, K1 = torch.randn(d_out, n, generator=g), torch.randn(d_in, n, generator=g)
    A = torch.randn(d_in, 2 * d_in, generator=g)
    # A @ A.T is symmetric only up to rounding on some BLAS kernels; C0 from pmet.stats is exactly symmetric
    # (mirrored), and the normal equations below hold to 1e-9 only for a symmetric C0
    C0, lam = (A @ A.T + (A @ A.T).T) / (4 * d_in), 3.5
    delta = solve_update(R, K1, C0, lam)
    assert delta.dtype == torch.float64 and delta.shape == (d_out, d_in)
    lhs = delta @ (lam * C0.double() + K1.double() @ K1.double().T)
    torch.testing.assert_close(lhs, R.double() @ K1.double().T, rtol=1e-9, atol=1e-9)


def test_spread_residual_eq11():
    R = torch.randn(5, 2)
    for L, l in [(8, 3), (8, 8), (5, 0)]:
        torch.testing.assert_close(spread_residual(R, L, l, "sqrt"), R / math.sqrt(L - l + 1))
        torch.testing.assert_close(spread_residual(R, L, l, "even"), R / (L - l + 1))
    with pytest.raises(ValueError):
        spread_residual(R, 3, 4)


def test_compute_keys_groups_and_uniform():
    k = torch.arange(12.0).view(1, 6, 2)  # one request, P = 1 + 5 prompts
    torch.testing.assert_close(compute_keys(k, [1, 5], "uniform"), k.mean(1))
    expected = (k[:, 0] + k[:, 1:].mean(1)) / 2  # MEMIT compute_ks: mean of the group means
    torch.testing.assert_close(compute_keys(k, [1, 5], "groups"), expected)


# ---------------------------------------------------------------------------------------------- hparams
def test_load_hparams_files_and_switches():
    hp = load_hparams("pmet", "gptj", "counterfact")
    assert (hp.layers, hp.mom2_update_weight, hp.v_num_grad_steps, hp.v_lr, hp.clamp_norm_factor) == (
        (3, 4, 5, 6, 7, 8),
        6000,
        30,
        0.2,
        0.75,
    )
    z = load_hparams("pmet", "gptj", "zsre")
    assert (z.mom2_update_weight, z.v_num_grad_steps, z.v_lr) == (4500, 20, 0.5)
    neox = load_hparams("pmet", "neox")
    assert (neox.layers, neox.mom2_update_weight, neox.clamp_norm_factor) == ((6, 7, 8, 9, 10), 15000, 0.8)
    memit = load_hparams("memit", "gptj")
    assert (memit.value_site, memit.spread, memit.stop_rule, memit.kl_factor, memit.mom2_update_weight) == (
        "block",
        "even",
        "memit",
        0.0625,
        15000,
    )
    assert load_hparams("pmet", "some-unknown-model").layers is None  # default file: layout's layers
    # a model tuned on CounterFact only edits zsRE with its own values, not GPT-J's defaults
    for method, base in (("pmet", "pmet"), ("memit", "memit"), ("pmet-even-spread", "pmet")):
        assert hparams_path(method, "smollm2", "zsre").name == f"{base}_smollm2_counterfact.json"
    assert hparams_path("pmet", "gptj", "zsre").name == "pmet_gptj_zsre.json"
    assert load_hparams("pmet-with-attn-weights", "gptj").update_attn_weights
    assert not load_hparams("pmet-no-attn-delta", "gptj").optimize_attn_delta
    assert load_hparams("pmet-even-spread", "gptj").spread == "even"
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        load_hparams("pmet", "gptj", not_a_field=1)
    with pytest.raises(ValueError, match="unknown editing method"):
        load_hparams("romeo", "gptj")  # (rome has its own hyperparameters now: the one loader reads them)
    with pytest.raises(ValueError):
        EditHparams(value_site="block", optimize_attn_delta=True)


# ---------------------------------------------------------------------------------------------- fast path
def test_truncated_forward_equals_full(tiny):
    model, tok = tiny
    seqs = [tok("The mother tongue of Danielle Darrieux is")["input_ids"], tok("Paris is")["input_ids"]]
    ids, mask = pad_right(seqs, pad_id_of(tok), "cpu")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        for L in range(model.layout.n_layers):
            h, _ = block_input(model, ids, mask, L)
            top = model.get_output_embeddings()(forward_from_layer(model, h, L, mask))
            torch.testing.assert_close(top[mask.bool()], full[mask.bool()], rtol=1e-5, atol=1e-6)
    assert len(model.layout.blocks(model)) == model.layout.n_layers  # the block list is put back


def test_batched_values_equal_one_at_a_time(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-gptj"]
    reqs = normalize_requests(REQS, tok)
    flat, _ = flatten(get_context_templates(model, tok))
    for method in ("pmet", "memit"):
        hp = load_hparams(method, model, v_num_grad_steps=12, v_batch_size=len(reqs))
        L = max(model.layout.critical_layers)
        batched, _ = compute_values(model, tok, reqs, hp, flat, L, use_cache=False, progress=False)
        single = [
            compute_values(model, tok, [r], replace(hp, v_batch_size=1), flat, L, use_cache=False, progress=False)[0]
            for r in reqs
        ]
        for name, v in batched.items():
            one = torch.cat([s[name] for s in single])
            assert (v - one).norm(dim=1).max() <= 1e-4 * one.norm(dim=1).min(), (method, name)


def test_attention_implementation_switch_restores(tiny_models):
    from pmet.editing.partial_forward import attention_implementation

    model, tok = tiny_models["tiny-llama"]
    before = model.config._attn_implementation
    other = "eager" if before != "eager" else "sdpa"
    ids = tok("Paris is the capital of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
        with attention_implementation(model, other):
            assert model.config._attn_implementation == other
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError), attention_implementation(model, other):
        raise RuntimeError
    assert model.config._attn_implementation == before


def test_bf16_autocast_values_are_close_and_cached_apart(tiny_models, tmp_cache):
    from pmet.editing.value_cache import value_cache_key

    model, tok = tiny_models["tiny-llama"]
    reqs = normalize_requests(REQS, tok)
    flat, _ = flatten(get_context_templates(model, tok))
    L = max(model.layout.critical_layers)
    hp = load_hparams("pmet", model, v_num_grad_steps=8, v_batch_size=len(reqs))
    hp16 = replace(hp, v_autocast="bfloat16")
    ref, _ = compute_values(model, tok, reqs, hp, flat, L, use_cache=False, progress=False)
    impl = model.config._attn_implementation
    low, info = compute_values(model, tok, reqs, hp16, flat, L, use_cache=False, progress=False)
    assert model.config._attn_implementation == impl  # eager attention only while optimising
    for name, v in ref.items():
        assert low[name].dtype == torch.float32
        # bf16 has an 8-bit mantissa: the optimised values agree to a few percent, not to 1e-4
        rel = (low[name] - v).norm(dim=1) / v.norm(dim=1)
        assert rel.max() < 0.05, (name, rel)
    model_id = {"fingerprint": "x", "weights": "y"}
    assert value_cache_key(model_id, hp, L, flat, reqs[0]) != value_cache_key(model_id, hp16, L, flat, reqs[0])
    assert "v_autocast" not in hp.to_dict() and hp16.to_dict()["v_autocast"] == "bfloat16"
    with pytest.raises(ValueError, match="v_autocast"):
        replace(hp, v_autocast="int8")


def test_run_edit_eval_overrides_enter_the_run(tiny_models, tmp_cache):
    """Notebooks pass hyperparameter overrides (Table 3's ``value_autocast``): they reach the editor, land in a
    run folder of their own, and None means "the file's value" (the same run as no override)."""
    from pmet.experiments import run_edit_eval
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-llama"]
    kw = dict(runs_dir=tmp_cache / "runs", progress=False)
    spec = RunSpec("tiny-llama", "pmet", n_edits=2)
    plain = run_edit_eval(model, tok, spec, **kw)
    same = run_edit_eval(model, tok, spec.replace(value_autocast=None), **kw)
    low = run_edit_eval(model, tok, spec.replace(value_autocast="bfloat16"), **kw)
    assert same["hparams"] == plain["hparams"] and same["edit_seconds"] == plain["edit_seconds"]  # read back
    assert low["hparams"] != plain["hparams"]
    assert low["hparams_values"]["v_autocast"] == "bfloat16" and "v_autocast" not in plain["hparams_values"]
    assert low["spec"]["value_autocast"] == "bfloat16" and plain["spec"]["value_autocast"] is None


def test_run_edit_eval_resumes_an_interrupted_evaluation_without_editing(tiny_models, tmp_cache, monkeypatch):
    """The edited weights wait in the run folder until the evaluation is complete: a second call after an
    interruption evaluates the same edited model without calling the editor, then removes them."""
    import pmet.editing
    import pmet.experiments as ex
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-llama"]
    spec = RunSpec("tiny-llama", "pmet", n_edits=2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fresh = ex.run_edit_eval(model, tok, spec, runs_dir=tmp_cache / "a", progress=False)
    real = ex._evaluate_and_save

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "_evaluate_and_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ex.run_edit_eval(model, tok, spec, runs_dir=tmp_cache / "b", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
    assert len(list((tmp_cache / "b").rglob("edited_weights.safetensors"))) == 1
    monkeypatch.setattr(ex, "_evaluate_and_save", real)
    monkeypatch.setattr(pmet.editing, "edit", lambda *a, **k: pytest.fail("edited again"))
    again = ex.run_edit_eval(model, tok, spec, runs_dir=tmp_cache / "b", progress=False)
    for m in ("efficacy", "generalization", "specificity", "efficacy_diff", "specificity_diff"):
        assert again[m] == fresh[m], m
    assert again["delta_norms"] == pytest.approx(fresh["delta_norms"], rel=1e-6)
    assert not list((tmp_cache / "b").rglob("edited_weights.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_value_autocast_reaches_the_editors_that_have_values(tiny_models):
    from pmet.experiments import method_hparams

    model, _ = tiny_models["tiny-llama"]
    o = {"v_autocast": "bfloat16"}
    assert method_hparams("rome", model, "counterfact", o).value_hparams().v_autocast == "bfloat16"
    assert method_hparams("pmet", model, "counterfact", o).v_autocast == "bfloat16"
    assert method_hparams("ft", model, "counterfact", o) == method_hparams("ft", model, "counterfact")
    assert "v_autocast" not in method_hparams("rome", model, "counterfact").to_dict()  # old run ids stay
    assert method_hparams("none", model, "counterfact", o) is None


# ---------------------------------------------------------------------------------------------- the editor
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
@pytest.mark.parametrize("method", ["pmet", "memit", "memit-ffn"])
def test_edit_makes_target_top_and_restores(tiny_models, tmp_cache, name, method, request):
    if (name, method) == ("tiny-gemma3", "pmet"):  # runs; reported as XPASS (strict: a failure) if it ever works
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason=(
                    "PMET applies only δ^m: on this random tiny Gemma-3 the optimisation stops as soon as "
                    "δ^a + δ^m make the target top (step 2), and δ^m alone does not; MEMIT passes on the same "
                    "model and PMET edits the real gemma3-270m"
                ),
            )
        )
    model, tok = tiny_models[name]
    before = params_of(model)
    prompt = REQ["prompt"].format(REQ["subject"])
    target = tok(" " + REQ["target_new"], add_special_tokens=False)["input_ids"][0]
    assert _top(model, tok, prompt) != target
    result = edit(model, tok, [REQ], method=method, progress=False)
    try:
        assert _top(model, tok, prompt) == target
        crit = model.layout.critical_layers
        assert _changed(model, before) == {model.layout.weight_name("mlp_out", l) for l in crit}
        assert set(result.deltas) == {model.layout.weight_name("mlp_out", l) for l in crit}
        # each Δ solves the normal equations of Eq. 8 with the keys, statistics and spread residual used
        lam = result.hparams.mom2_update_weight
        for w, delta in result.deltas.items():
            K = result.keys[w].T.double()
            lhs = delta.double() @ (lam * result.stats[w].double() + K @ K.T)
            rhs = result.residuals[w] @ K.T
            assert (lhs - rhs).norm() <= 1e-4 * rhs.norm()
    finally:
        result.restore()
    assert not _changed(model, before)  # bit for bit


def test_ablation_switches_change_exactly_their_weights(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-llama"]
    lay = model.layout
    crit = lay.critical_layers
    mlp_out = {lay.weight_name("mlp_out", l) for l in crit}
    attn_out = {lay.weight_name("attn_out", l) for l in crit}
    before = params_of(model)
    for method in METHODS:
        result = edit(model, tok, [REQ], method=method, hparams={"v_num_grad_steps": 5}, progress=False)
        changed = _changed(model, before)
        result.restore()
        expected = mlp_out | (attn_out if method == "pmet-with-attn-weights" else set())
        assert changed == expected, method
        info = result.value_info[0]
        if method in ("pmet-no-attn-delta", "memit-ffn"):
            assert info["delta_norm_attn"] == 0.0 and info["delta_norm_mlp"] > 0
        elif method == "memit":
            assert set(result.values) == {"block"}
        else:
            assert info["delta_norm_attn"] > 0 and info["delta_norm_mlp"] > 0
    assert not _changed(model, before)


def test_even_vs_sqrt_spread_scales_the_first_layer_update(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-neox"]
    hp = {"v_num_grad_steps": 5}
    sqrt = edit(model, tok, [REQ], method="pmet", hparams=hp, progress=False)
    sqrt.restore()
    even = edit(model, tok, [REQ], method="pmet-even-spread", hparams=hp, progress=False)
    even.restore()
    assert all(i["cached"] for i in even.value_info)  # same values (the spread does not change them)
    first = model.layout.weight_name("mlp_out", min(model.layout.critical_layers))
    n = len(model.layout.critical_layers)  # L - l + 1 at the first critical layer
    torch.testing.assert_close(sqrt.deltas[first], even.deltas[first] * n / math.sqrt(n), rtol=1e-4, atol=1e-7)
    last = model.layout.weight_name("mlp_out", max(model.layout.critical_layers))
    assert last in sqrt.deltas and last in even.deltas


def test_value_cache_is_hit_on_second_call(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-gpt2"]
    first = edit(model, tok, REQS[:2], method="pmet", hparams={"v_num_grad_steps": 5}, progress=False)
    first.restore()
    assert not any(i["cached"] for i in first.value_info)
    assert list((tmp_cache / "values").rglob("*.safetensors"))
    second = edit(model, tok, REQS[:2], method="pmet", hparams={"v_num_grad_steps": 5}, progress=False)
    second.restore()
    assert all(i["cached"] for i in second.value_info)
    for k in first.values:
        assert torch.equal(first.values[k], second.values[k])
    third = edit(model, tok, REQS[:2], method="pmet", hparams={"v_num_grad_steps": 6}, progress=False)
    third.restore()
    assert not any(i["cached"] for i in third.value_info)  # a different setting is a different key


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": "no slot here", "subject": "Danielle Darrieux", "target_new": "Paris"},
        {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux"},
        {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "  "},
        {"prompt": "The mother tongue of {}", "subject": "", "target_new": "Paris"},
    ],
)
def test_bad_request_raises_before_any_change(tiny_models, tmp_cache, bad):
    model, tok = tiny_models["tiny-gptj"]
    before = params_of(model)
    with pytest.raises(InvalidRecordError):
        edit(model, tok, [REQ, bad], method="pmet", progress=False)
    assert not _changed(model, before)


def test_targets_get_a_leading_space():
    reqs = normalize_requests([{**REQ, "target_new": {"str": "Paris"}}, {**REQ, "target_new": " Paris"}])
    assert [r["target_new"] for r in reqs] == [" Paris", " Paris"]


def test_a_run_waits_for_another_process_on_the_same_run(tiny_models, tmp_cache):
    """Two processes asking for one run (two notebooks on one cache) used to both edit and append every
    record twice to its records.jsonl. A run now holds a lock on its folder: a second caller waits, then
    returns what the first wrote instead of running again. Here the first holder is simulated by holding
    the lock and writing the summary before releasing it."""
    import json
    import threading

    import pmet.experiments as ex
    from pmet.runcache import run_lock
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-llama"]
    runs = tmp_cache / "runs"
    spec = RunSpec("tiny-llama", "none", n_edits=2)
    out = ex.locate(model, spec, None, runs).folder
    got, started = {}, threading.Event()

    def second():
        started.set()
        got["summary"] = ex.run_edit_eval(model, tok, spec, runs_dir=runs, progress=False)

    with run_lock(out):
        worker = threading.Thread(target=second)
        worker.start()
        started.wait(10)
        worker.join(0.5)
        assert worker.is_alive() and "summary" not in got  # blocked on the lock
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"written_by": "the first process"}))
    worker.join(60)
    assert got["summary"] == {"written_by": "the first process"}
    assert not (out / "records.jsonl").exists()  # it did not evaluate again
