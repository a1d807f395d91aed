"""Fig. 2 similarity and causal tracing on the tiny random models (seconds)."""

import numpy as np
import pandas as pd
import pytest
import torch

from pmet.analysis import causal_trace as ct
from pmet.analysis import similarity as sim

PROMPTS = ["The capital of France is", "Rome is the capital of", "Michael Jordan plays", "Paris"]


# ------------------------------------------------------------------------------------------ Jaccard
def test_jaccard_hand_cases():
    assert sim.jaccard([1, 2, 3], [1, 2, 3]) == 1.0
    assert sim.jaccard([1, 2], [3, 4]) == 0.0
    assert sim.jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 4)
    assert sim.jaccard([1, 2, 3, 4], [4, 5, 6, 7]) == pytest.approx(1 / 7)
    assert sim.jaccard([], []) == 1.0


def test_topk_jaccard_matches_set_version():
    a = torch.tensor([[1, 2, 3], [1, 2, 3], [5, 6, 7], [9, 8, 7]])
    b = torch.tensor([[3, 2, 1], [2, 3, 4], [1, 2, 3], [7, 1, 2]])
    got = sim.topk_jaccard(a, b).tolist()
    want = [sim.jaccard(x.tolist(), y.tolist()) for x, y in zip(a, b)]
    assert got == pytest.approx(want)
    assert got == pytest.approx([1.0, 0.5, 0.0, 0.2])


# ------------------------------------------------------------------------------------------ Fig. 2
def test_states_decompose_residual(tiny):
    """h^l = h^{l-1} + a^l + m^l: the recorded input / MHSA / FFN states are the right ones."""
    model, tok = tiny
    batch = sim._tokenize(tok, PROMPTS, "cpu")
    st = sim._last_token_states(model, batch)
    recon = st["h_in"][:, :-1] + st["a"][:, :-1] + st["m"][:, :-1]
    torch.testing.assert_close(st["h_in"][:, 1:], recon, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_states(tiny_models):
    model, tok = tiny_models["tiny-llama"]
    alone = sim._last_token_states(model, sim._tokenize(tok, PROMPTS[-1:], "cpu"))
    padded = sim._last_token_states(model, sim._tokenize(tok, PROMPTS, "cpu"))
    for key in alone:
        torch.testing.assert_close(alone[key][0], padded[key][-1], atol=1e-5, rtol=1e-5)


def test_similarity_frame(tiny):
    model, tok = tiny
    df = sim.component_similarity(model, tok, PROMPTS, k=10, batch_size=3, progress=False)
    n = model.layout.n_layers
    assert list(df.columns) == ["layer", "component", "cosine", "jaccard", "cosine_std", "jaccard_std", "n"]
    assert len(df) == 2 * n and set(df.component) == {"MHSA", "FFN"}
    assert sorted(df.layer.unique()) == list(range(n))
    assert not df.isna().any().any()
    assert (df.n == len(PROMPTS)).all()
    assert df.cosine.between(-1, 1).all() and df.jaccard.between(0, 1).all()
    summary = sim.claim_summary(df)
    assert set(summary.part) == {"early", "late"}
    assert len(sim.claim_verdict(summary)) == 6


# ------------------------------------------------------------------------------------------ causal tracing
PROMPT, SUBJECT = "The capital of France is", "France"


def test_subject_token_range(tiny_models):
    _, tok = tiny_models["tiny-llama"]
    b, e = ct.subject_token_range(tok, PROMPT, SUBJECT)
    ids = tok(PROMPT)["input_ids"]
    assert tok.decode(ids[b:e]).strip() == SUBJECT


def test_zero_noise_gives_zero_effects(tiny):
    model, tok = tiny
    res = ct.trace_fact(model, tok, PROMPT, SUBJECT, noise=0.0, n_samples=2, window=2, positions="all")
    assert res["p_corrupted"] == pytest.approx(res["p_clean"], abs=1e-5)
    for k in ct.KINDS:
        assert res["effect"][k].shape == (len(res["tokens"]), model.layout.n_layers)
        np.testing.assert_allclose(res["effect"][k], 0.0, atol=1e-5)


def test_restoring_last_block_at_last_token_recovers_fully(tiny):
    model, tok = tiny
    res = ct.trace_fact(model, tok, PROMPT, SUBJECT, noise=5.0, n_samples=4, window=2, positions="subject_last+last")
    assert list(res["positions"]) == [res["subject_range"][1] - 1, len(res["tokens"]) - 1]
    assert abs(res["p_clean"] - res["p_corrupted"]) > 1e-4  # the noise does something
    full = res["effect"]["block"][1, -1]
    assert full == pytest.approx(res["p_clean"] - res["p_corrupted"], abs=1e-5)
    assert res["restored"]["block"][1, -1] == pytest.approx(res["p_clean"], abs=1e-5)


def test_trace_is_deterministic_for_a_seed(tiny_models):
    model, tok = tiny_models["tiny-gptj"]
    kw = dict(noise=2.0, n_samples=3, window=2, positions="subject_last+last")
    a = ct.trace_fact(model, tok, PROMPT, SUBJECT, seed=1, **kw)
    b = ct.trace_fact(model, tok, PROMPT, SUBJECT, seed=1, **kw)
    c = ct.trace_fact(model, tok, PROMPT, SUBJECT, seed=2, **kw)
    for k in ct.KINDS:
        np.testing.assert_array_equal(a["effect"][k], b["effect"][k])
    assert a["p_corrupted"] == b["p_corrupted"] != c["p_corrupted"]


def test_batched_matches_one_config_per_batch(tiny_models):
    """Chunking the restorations into batches does not change the numbers."""
    model, tok = tiny_models["tiny-llama"]
    kw = dict(noise=2.0, n_samples=2, window=3, positions="subject_last+last", seed=0)
    big = ct.trace_fact(model, tok, PROMPT, SUBJECT, max_batch=4096, **kw)
    small = ct.trace_fact(model, tok, PROMPT, SUBJECT, max_batch=10, **kw)  # 5 restorations per batch
    for k in ct.KINDS:
        np.testing.assert_allclose(big["effect"][k], small["effect"][k], atol=1e-5)


def test_trace_facts_frame_and_critical_layers(tiny_models):
    from pmet.data import KnownFact

    model, tok = tiny_models["tiny-llama"]
    facts = [
        KnownFact(i, s, p, "", "", "P0", "")
        for i, (s, p) in enumerate([("France", "The capital of France is"), ("Rome", "Rome is the capital of")])
    ]
    df = ct.trace_facts(model, tok, facts, n_samples=2, window=2, progress=False)
    n = model.layout.n_layers
    assert set(df.columns) >= {"fact", "kind", "layer", "effect"}
    assert len(df) == 2 * 3 * n and (df.position == "subject_last").all()
    assert df.attrs["noise"] > 0
    avg = ct.average_effects(df)
    assert len(avg) == 3 * n and (avg.n == 2).all()
    crit = ct.choose_critical_layers(avg, size=2)
    start = max(0, crit["peak"] - 1)
    assert crit["layers"] == (start, start + 1)


def test_choose_critical_layers_rule():
    effects = [0.0, 0.1, 0.3, 0.5, 0.7, 0.6, 0.2, 0.1, 0.9]  # late maximum (layer 8) is outside the search range
    avg = pd.DataFrame({"kind": "mlp", "layer": range(9), "effect": effects})
    crit = ct.choose_critical_layers(avg, size=3, search_fraction=2 / 3)
    assert crit["peak"] == 4 and crit["layers"] == (2, 3, 4)
    assert ct.choose_critical_layers(avg, size=6)["layers"] == (0, 1, 2, 3, 4, 5)


def test_select_facts_and_subsample(tiny_models):
    from pmet.data import KnownFact

    model, tok = tiny_models["tiny-llama"]
    facts = [KnownFact(0, "France", "The capital of France is", "", "Paris", "P0", "")]
    every = ct.select_facts(model, tok, facts, only_correct=False)
    assert len(every) == 1 and {"answer_id", "correct", "p_top1"} <= set(every.columns)
    assert ct.subsample(range(10), 4, seed=0) == ct.subsample(range(10), 4, seed=0)
    assert ct.subsample(range(3), None) == [0, 1, 2]
