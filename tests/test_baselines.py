"""Baselines FT-W, ROME and MEND on the tiny random models (fast: the whole file runs in well under a minute)."""

import json

import pytest
import torch

from pmet.editing import normalize_requests
from pmet.editing.baseline import target_batch, target_nll
from pmet.editing.ft import FTHparams, apply_ft
from pmet.editing.mend import (
    MendEditor,
    MendHparams,
    apply_mend,
    gradient_factors,
    load_editor,
    sample_batch,
    train,
    training_examples,
    training_step,
)
from pmet.editing.rome import RomeHparams, apply_rome

REQS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English", "case_id": 0},
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "piano"}, "case_id": 1},
]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, state):
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())


def _changed(model, state):
    now = model.state_dict()
    return {k for k, v in state.items() if not torch.equal(now[k], v)}


# ---------------------------------------------------------------------------------------------- FT-W
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_ft_linf_ball_only_its_layer_and_restore(tiny_models, name):
    model, tok = tiny_models[name]
    before = _state(model)
    eps = 2e-3
    hp = FTHparams(layers=(2,), num_steps=5, lr=1e-2, norm_constraint=eps)
    res = apply_ft(model, tok, REQS, hparams=hp)
    wname = model.layout.weight_name("mlp_out", 2)
    assert _changed(model, before) == {wname}
    assert set(res.deltas) == {wname}
    d = res.deltas[wname]
    assert d.shape == tuple(model.layout.get_weight(model, "mlp_out", 2).shape)
    assert d.abs().max() <= eps * (1 + 1e-5) and d.abs().max() > 0.5 * eps
    w0 = before[wname].T if model.layout.conv1d else before[wname]
    torch.testing.assert_close(model.layout.get_weight(model, "mlp_out", 2).detach(), w0 + d, rtol=0, atol=1e-6)
    curve = res.value_info[0]["loss_curve"]
    assert curve[-1] < curve[0]
    res.restore()
    _assert_same(model, before)


# ---------------------------------------------------------------------------------------------- ROME
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gptj"])  # without and with a bias in W_O^FFN
def test_rome_rank_one_and_key_maps_to_value(tiny_models, tmp_cache, name):
    model, tok = tiny_models[name]
    before = _state(model)
    hp = RomeHparams(layer=1, v_num_grad_steps=5, mom2_n_tokens=1000)
    res = apply_rome(model, tok, REQS[:1], hparams=hp)
    wname = model.layout.weight_name("mlp_out", 1)
    assert _changed(model, before) == {wname}
    d = res.deltas[wname].double()
    s = torch.linalg.svdvals(d)
    assert s[1] / s[0] < 1e-6  # rank one
    k, v = res.keys[wname][0].double(), res.values["mlp"][0].double()
    w0 = (before[wname].T if model.layout.conv1d else before[wname]).double()
    bias = model.layout.module(model, "mlp_out", 1).bias
    b = bias.detach().double() if bias is not None else 0.0
    torch.testing.assert_close((w0 + d) @ k + b, v, rtol=1e-4, atol=1e-4)  # (W + Δ) k* = v*
    assert not torch.allclose(w0 @ k + b, v, atol=1e-3)
    res.restore()
    _assert_same(model, before)


def test_rome_sequential_two_requests(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-neox"]
    before = _state(model)
    hp = RomeHparams(layer=1, v_num_grad_steps=5, mom2_n_tokens=1000)
    res = apply_rome(model, tok, REQS, hparams=hp)
    wname = model.layout.weight_name("mlp_out", 1)
    s = torch.linalg.svdvals(res.deltas[wname].double())
    assert s[1] / s[0] > 1e-4 and s[2] / s[0] < 1e-6  # two rank-one edits
    assert len(res.value_info) == 2 and res.values["mlp"].shape[0] == 2
    # the second edit was computed on the model with the first one applied: its key still maps to its value
    w = model.layout.get_weight(model, "mlp_out", 1).detach().double()
    b = model.layout.module(model, "mlp_out", 1).bias.detach().double()
    k2, v2 = res.keys[wname][1].double(), res.values["mlp"][1].double()
    torch.testing.assert_close(w @ k2 + b, v2, rtol=1e-4, atol=1e-4)
    res.restore()
    _assert_same(model, before)


def test_rome_trajectory_replay_is_bit_exact(tiny_models, tmp_cache):
    """Edits taken from a trajectory file give exactly the weights of an uninterrupted run; shorter runs
    replay a longer file for free; a file is only replaced by a longer trajectory."""
    from pmet.editing.rome import _checkpoint_key, load_checkpoint
    from pmet.experiments import table_records

    model, tok = tiny_models["tiny-gptj"]
    before = _state(model)
    hp = RomeHparams(layer=1, v_num_grad_steps=4, mom2_n_tokens=1000)
    reqs = [r.as_request() for r in table_records("counterfact", 4)]
    wname = model.layout.weight_name("mlp_out", 1)
    straight = apply_rome(model, tok, reqs, hparams=hp)
    w_straight = model.get_parameter(wname).detach().clone()
    straight.restore()
    one = apply_rome(model, tok, reqs[:1], hparams=hp)
    w_one = model.get_parameter(wname).detach().clone()
    one.restore()
    ckpt = tmp_cache / "rome.safetensors"
    part = apply_rome(model, tok, reqs[:2], hparams=hp, checkpoint=ckpt, checkpoint_every=1)
    part.restore()
    assert part.timings["replayed"] == 0
    _assert_same(model, before)
    seen = []
    resumed = apply_rome(
        model,
        tok,
        reqs,
        hparams=hp,
        checkpoint=ckpt,
        checkpoint_every=1,
        on_step=lambda k, p: seen.append((k, float(p.deltas[wname].norm()))),
    )
    assert resumed.timings["replayed"] == 2 and [k for k, _ in seen] == [1, 2, 3, 4]
    assert torch.equal(model.get_parameter(wname).detach(), w_straight)
    assert torch.equal(resumed.deltas[wname], straight.deltas[wname])
    assert torch.equal(resumed.values["mlp"], straight.values["mlp"]) and len(resumed.value_info) == 4
    resumed.restore()
    short = apply_rome(model, tok, reqs[:1], hparams=hp, checkpoint=ckpt)
    assert short.timings["replayed"] == 1 and torch.equal(model.get_parameter(wname).detach(), w_one)
    short.restore()
    other = apply_rome(model, tok, [reqs[1], reqs[0]], hparams=hp, checkpoint=ckpt)
    other.restore()
    assert other.timings["replayed"] == 0
    m, tensors, _ = load_checkpoint(ckpt, _checkpoint_key(hp, wname, before[wname]), reqs)
    assert m == 4 and tensors["a"].shape[0] == 4  # the 4-edit trajectory was kept
    _assert_same(model, before)


# ---------------------------------------------------------------------------------------------- MEND
def _tiny_mend_hp(**kw):
    return MendHparams(
        **{
            **dict(
                rank=8, edit_lr_init=1e-2, lr=1e-3, lr_lr=1e-3, batch_size=2, steps=4, checkpoint_every=2, log_every=1
            ),
            **kw,
        }
    )


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_mend_identity_init_is_a_gradient_step(tiny_models, name):
    model, tok = tiny_models[name]
    before = _state(model)
    hp = _tiny_mend_hp()
    editor = MendEditor.for_model(model, hp)
    reqs = normalize_requests(REQS, tok)
    batch, labels = target_batch(tok, [r["prompt"].format(r["subject"]) for r in reqs], [r["target_new"] for r in reqs])
    grads = {}
    params = dict(model.named_parameters())
    flags = {n: params[n].requires_grad for n in editor.names}
    try:
        for n in editor.names:
            params[n].requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(target_nll(model(**batch).logits, labels).sum(), [params[n] for n in editor.names])
    finally:
        for n in editor.names:
            params[n].requires_grad_(flags[n])
    for n, gi in zip(editor.names, g):
        grads[n] = gi.T if model.layout.conv1d else gi
    factors, _ = gradient_factors(model, tok, reqs, editor.names)  # (u_t, δ_t) of the tokens with a gradient
    res = apply_mend(model, tok, REQS, hparams=hp, editor=editor)
    assert set(res.deltas) == set(editor.names) and len(editor.names) == 6  # mlp_in, mlp_out of the last 3
    for n in editor.names:
        d = res.deltas[n]
        assert d.shape == grads[n].shape
        torch.testing.assert_close(d, -hp.edit_lr_init * grads[n], rtol=1e-4, atol=1e-9)  # ΔW = -α ∇W
        u, delta = factors[n]
        torch.testing.assert_close(d, -hp.edit_lr_init * delta.T @ u, rtol=1e-4, atol=1e-9)  # Σ_t δ_t u_t^T
        sv = torch.linalg.svdvals(d.double())
        assert int((sv > 1e-5 * sv[0]).sum()) <= u.shape[0] < min(d.shape)  # rank <= number of tokens
    res.restore()
    _assert_same(model, before)


@pytest.fixture(scope="module")
def mend_examples():
    return {"counterfact": training_examples("counterfact", limit=6), "zsre": training_examples("zsre", limit=6)}


def test_mend_one_training_step_reduces_edit_loss(tiny_models, mend_examples):
    model, tok = tiny_models["tiny-llama"]
    before = _state(model)
    hp = _tiny_mend_hp(c_loc=0.0, use_rephrase=False, lr=1e-3)
    torch.manual_seed(0)
    editor = MendEditor.for_model(model, hp).train()
    opt = torch.optim.Adam(editor.parameters(), lr=hp.lr)
    batch = sample_batch(mend_examples, hp, 0)
    loss0, info0 = training_step(model, tok, editor, batch, hp)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    editor.eval()  # the normalisation statistics of the first call (training mode updates them)
    _, info1 = training_step(model, tok, editor, batch, hp)
    assert info1["edit_nll_post"] < info0["edit_nll_post"]
    _assert_same(model, before)  # training never writes into the model


def test_mend_checkpoint_resume_and_missing_editor(tiny_models, tmp_cache, mend_examples):
    model, tok = tiny_models["tiny-gptj"]
    hp = _tiny_mend_hp()
    with pytest.raises(FileNotFoundError, match="train it with: python -m pmet.editing.mend train"):
        load_editor(model, hp)
    straight = train(model, tok, hp, out_dir=tmp_cache / "a", examples=mend_examples, progress=False)
    part = train(model, tok, hp, out_dir=tmp_cache / "b", examples=mend_examples, progress=False, max_steps_this_run=2)
    assert not part.exists() and (tmp_cache / "b" / "checkpoints" / "latest.json").exists()
    resumed = train(model, tok, hp, out_dir=tmp_cache / "b", examples=mend_examples, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    rows = (tmp_cache / "b" / "curve.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    # the default location is used by the editing API
    train(model, tok, hp, examples=mend_examples, progress=False)
    before = _state(model)
    res = apply_mend(model, tok, REQS, hparams=hp)
    assert _changed(model, before) == set(res.deltas)
    res.restore()
    _assert_same(model, before)
    # cached table runs are keyed by the trained editor too: retraining never reuses an old run
    from pmet.editing.mend import editor_dir
    from pmet.experiments import _artifact_id

    ident = _artifact_id("mend", model, hp)
    assert ident.startswith("_ed") and _artifact_id("pmet", model, hp) == ""
    path = editor_dir(model, hp) / "editor.safetensors"
    path.write_bytes(path.read_bytes() + b" ")
    assert _artifact_id("mend", model, hp) not in ("", ident)


def test_rome_sweep_prefix_equals_separate_runs(tiny_models, tmp_cache):
    """Fig. 3's ROME points come from one sequential run evaluated after n edits; they must equal runs
    made separately with n edits (same records, same metrics, same Δ)."""
    from pmet.experiments import run_edit_eval, run_sweep
    from pmet.runspec import RunSpec

    model, tok = tiny_models["tiny-gptj"]
    rome = RunSpec("tiny-gptj", "rome")
    before = _state(model)
    sizes = [1, 3]
    swept = run_sweep(model, tok, rome, sizes, runs_dir=tmp_cache / "sweep", progress=False)
    _assert_same(model, before)
    assert sorted(swept) == sizes
    for n in sizes:
        alone = run_edit_eval(model, tok, rome.replace(n_edits=n), runs_dir=tmp_cache / "alone", progress=False)
        for m in ("efficacy", "generalization", "specificity", "efficacy_diff", "specificity_diff"):
            assert swept[n][m] == pytest.approx(alone[m], abs=1e-9), (n, m)
        ((name, norm),) = alone["delta_norms"].items()
        assert swept[n]["delta_norms"][name] == pytest.approx(norm, rel=1e-6)
        assert swept[n]["n_edits"] == n and swept[n]["hparams"] == alone["hparams"]
    # a second call reads the summaries back without editing
    again = run_sweep(model, tok, rome, sizes, runs_dir=tmp_cache / "sweep", progress=False)
    assert {n: json.loads(json.dumps(s, default=str)) for n, s in swept.items()} == again
    # a longer sweep continues from the checkpoint at 3 edits and lands where a fresh run lands
    longer = run_sweep(model, tok, rome, sizes + [4], runs_dir=tmp_cache / "sweep", progress=False)
    alone = run_edit_eval(model, tok, rome.replace(n_edits=4), runs_dir=tmp_cache / "fresh", progress=False)
    assert longer[3] == again[3]
    for m in ("efficacy", "generalization", "specificity", "efficacy_diff", "specificity_diff"):
        assert longer[4][m] == alone[m], m
    assert longer[4]["delta_norms"] == alone["delta_norms"]
    _assert_same(model, before)


# ---------------------------------------------------------------------------------------------- API
@pytest.mark.parametrize("method", ["ft", "rome"])
def test_shared_edit_dispatch(tiny_models, tmp_cache, method):
    from pmet.editing import edit

    model, tok = tiny_models["tiny-llama"]
    before = _state(model)
    res = edit(
        model,
        tok,
        REQS[:1],
        method=method,
        progress=False,
        hparams={"ft": {"num_steps": 2}, "rome": {"v_num_grad_steps": 3}}[method],
    )
    assert res.method == method and res.deltas
    res.restore()
    _assert_same(model, before)


def test_baseline_without_hyperparameters_is_unavailable_not_a_crash():
    from pmet.editing import MethodUnavailable
    from pmet.editing import hparams_path as hparams_file

    with pytest.raises(MethodUnavailable, match="no mend hyperparameter file for no-such-model"):
        hparams_file("mend", "no-such-model")


def test_mend_never_trains_on_a_record_any_table_can_edit():
    """MEND's training examples and every table's record pool (all sizes, both record formats) are disjoint:
    before, 1,298 full-field CounterFact train-split records were in both."""
    from pmet.data import load_counterfact
    from pmet.experiments import table_pool_ids, table_records

    cf_pool = {r.case_id for r in table_records("counterfact", None, full_fields_only=False)}
    assert cf_pool == table_pool_ids("counterfact")
    assert cf_pool & {r.case_id for r in load_counterfact("train")}  # the overlap the exclusion removes
    cf_train = {ex.source_id for ex in training_examples("counterfact")}
    assert cf_train and not cf_train & cf_pool
    z_pool = {r.src for r in table_records("zsre", None)}
    z_train = {ex.source_id for ex in training_examples("zsre")}
    assert z_train and not z_train & z_pool
