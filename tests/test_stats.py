import pytest
import torch

from pmet.hooks import Trace
from pmet.stats import add_gram, corpus_token_windows, key_second_moments, mirror_upper


def test_streamed_statistic_equals_direct(tiny, tmp_cache):
    model, tok = tiny
    layers = [1, 2]
    stats = key_second_moments(
        model, tok, layers, n_tokens=700, seq_len=64, batch_size=3, dtype="float64", progress=False
    )
    from pmet.data import load_text_corpus

    windows = corpus_token_windows(tok, load_text_corpus("wikitext"), 64, 700)
    with Trace(model, record=[("mlp_key", l) for l in layers]) as tr:
        model(input_ids=windows)
    for l in layers:
        k = tr["mlp_key", l].reshape(-1, tr["mlp_key", l].shape[-1])[:700].double()
        direct = k.T @ k / k.shape[0]
        torch.testing.assert_close(stats[l], direct, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("d,n_blocks", [(10, 4), (7, 3), (5, 1), (3, 4)])
def test_blocked_gram_equals_full(d, n_blocks):
    g = torch.Generator().manual_seed(d)
    ks = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in (11, 4)]
    acc = None
    for k in ks:
        acc = add_gram(acc, k, n_blocks)
    full = torch.cat(ks).T @ torch.cat(ks)
    torch.testing.assert_close(mirror_upper(acc, n_blocks), full, rtol=1e-12, atol=1e-12)


def test_cache_reused_and_corruption_recovered(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-llama"]
    kw = dict(n_tokens=300, seq_len=32, progress=False)
    first = key_second_moments(model, tok, [1], **kw)[1]
    files = list(tmp_cache.rglob("*.safetensors"))
    assert len(files) == 1
    # a second call must not run the model
    calls = []
    h = model.layout.block(model, 0).register_forward_hook(lambda *a: calls.append(1))
    try:
        again = key_second_moments(model, tok, [1], **kw)[1]
    finally:
        h.remove()
    assert calls == [] and torch.equal(first, again)
    files[0].write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="corrupt"):
        fixed = key_second_moments(model, tok, [1], **kw)[1]
    torch.testing.assert_close(fixed, first)
    # a different token count is a different cache entry
    key_second_moments(model, tok, [1], n_tokens=200, seq_len=32, progress=False)
    assert len(list(tmp_cache.rglob("*.safetensors"))) == 2


def test_attn_key_statistic_shape(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-gptj"]
    s = key_second_moments(model, tok, [2], component="attn_key", n_tokens=100, seq_len=32, progress=False)[2]
    d = model.layout.get_weight(model, "attn_out", 2).shape[1]
    assert s.shape == (d, d) and torch.allclose(s, s.T)
    with pytest.raises(ValueError, match="dtype"):
        key_second_moments(model, tok, [2], dtype="float16", progress=False)
