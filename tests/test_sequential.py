"""Sequential (lifelong) editing on a tiny model: rounds, measurements, cache and resume."""

import json

import pytest
import torch
from helpers import params_of

import pmet.editing
from pmet.sequential import perplexity, run_sequential, sequential_frame, weight_stats

SMALL = {"n_retention": 3, "n_known": 4, "ppl_tokens": 512, "eval_batch_size": 16, "progress": False}
TINY_NS = {"null_space_threshold": 1e-4, "null_space_alpha": 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _count_edits(monkeypatch):
    calls = []
    real = pmet.editing.edit

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pmet.editing, "edit", counting)
    return calls


def test_weight_stats_and_perplexity_definitions(tiny_models):
    w0 = torch.eye(3)
    w = torch.diag(torch.tensor([4.0, 1.0, 0.5]))
    s = weight_stats(w0, w)
    assert s["delta_fro"] == pytest.approx((9 + 0 + 0.25) ** 0.5)
    assert s["delta_sigma_max"] == pytest.approx(3.0) and s["cond"] == pytest.approx(8.0)
    model, _ = tiny_models["tiny-llama"]
    x = torch.randint(0, 100, (2, 16))
    logits = model(input_ids=x).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    assert perplexity(model, x, batch_size=1) == pytest.approx(float(torch.exp(nll)), rel=1e-5)


def test_sequential_rounds_measure_cache_and_resume(tiny_models, tmp_cache, tmp_path, monkeypatch):
    model, tok = tiny_models["tiny-llama"]
    before = params_of(model)
    runs = tmp_path / "runs"
    calls = _count_edits(monkeypatch)
    res = run_sequential(model, tok, "pmet", rounds=2, batch=2, runs_dir=runs, **SMALL)
    assert calls == [2, 2]
    assert [r["round"] for r in res] == [0, 1, 2] and [r["n_edits"] for r in res] == [0, 2, 4]
    assert res[0]["retention_neighborhood"] == 100.0 and res[0]["retention_known"] == 100.0
    assert res[0]["delta_fro"] == 0.0 and res[2]["delta_fro"] > 0
    assert len(res[2]["records"]) == 4 and len(res[1]["records"]) == 2  # every past edit is re-scored
    assert 0 <= res[1]["efficacy"] <= 100 and res[1]["efficacy_first_round"] == res[1]["efficacy"]
    assert set(res[2]["weights"]) == {model.layout.weight_name("mlp_out", l) for l in model.layout.critical_layers}
    assert res[0]["perplexity"] > 0 and all("cond" in v for v in res[0]["weights"].values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # left unedited
    folder = next(runs.rglob("weights_002.safetensors")).parent
    assert sorted(p.name for p in folder.glob("round_*.json")) == ["round_000.json", "round_001.json", "round_002.json"]

    # a second call reads the cache; a longer run extends it by its new rounds only
    assert run_sequential(model, tok, "pmet", rounds=2, batch=2, runs_dir=runs, **SMALL) == res
    assert calls == [2, 2]
    longer = run_sequential(model, tok, "pmet", rounds=3, batch=2, runs_dir=runs, **SMALL)
    assert calls == [2, 2, 2] and longer[:3] == res and longer[3]["n_edits"] == 6

    assert sorted(p.name for p in folder.glob("weights_*")) == ["weights_003.safetensors"]  # the last round's
    frame = sequential_frame({"pmet": longer})
    assert list(frame["n_edits"]) == [0, 2, 4, 6] and "records" not in frame
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_failing_round_leaves_the_model_unedited(tiny_models, tmp_cache, tmp_path, monkeypatch):
    model, tok = tiny_models["tiny-llama"]
    before = params_of(model)
    real = pmet.editing.edit
    seen = []

    def failing(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pmet.editing, "edit", failing)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(model, tok, "memit", rounds=2, batch=1, runs_dir=tmp_path, **SMALL)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    res = run_sequential(model, tok, "memit", rounds=2, batch=1, runs_dir=tmp_path, **SMALL)
    assert len(seen) == 3 and [r["round"] for r in res] == [0, 1, 2]  # resumed at round 2, not from scratch
    fresh = run_sequential(model, tok, "memit", rounds=2, batch=1, runs_dir=tmp_path / "fresh", **SMALL)
    for a, b in zip(res, fresh):  # resuming from the saved weights gives the uninterrupted run's numbers
        assert a.get("records") == b.get("records")
        assert a["delta_fro"] == pytest.approx(b["delta_fro"], rel=1e-6)
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)


def test_null_space_rounds_carry_the_earlier_keys(tiny_models, tmp_cache, tmp_path, monkeypatch):
    model, tok = tiny_models["tiny-llama"]
    priors = []
    real = pmet.editing.edit

    def spy(*args, **kwargs):
        priors.append(kwargs.get("prior_keys"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pmet.editing, "edit", spy)
    res = run_sequential(model, tok, "pmet-ns", rounds=2, batch=2, runs_dir=tmp_path, overrides=TINY_NS, **SMALL)
    assert priors[0] is None and set(priors[1]) == set(res[2]["weights"])
    for g in priors[1].values():  # Kp Kp^T of the first round's two keys: symmetric, rank <= 2
        assert torch.allclose(g, g.T) and int(torch.linalg.matrix_rank(g)) <= 2
    meta = json.loads(next(tmp_path.rglob("round_002.json")).read_text())
    assert meta["method"] == "pmet-ns" and meta["n_edits"] == 4


def test_bad_arguments_are_clear_errors(tiny_models, tmp_path):
    model, tok = tiny_models["tiny-llama"]
    with pytest.raises(ValueError, match="dataset 'zsre' is not supported"):
        run_sequential(model, tok, "pmet", 1, 1, dataset="zsre", runs_dir=tmp_path)
    with pytest.raises(ValueError, match="need .* CounterFact records"):
        run_sequential(model, tok, "pmet", 1000, 10, runs_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown editing method"):
        run_sequential(model, tok, "PMET", 1, 1, runs_dir=tmp_path)


def _rows(method, ppl, eff, recs):
    return [
        {
            "method": method,
            "round": t,
            "n_edits": 10 * t,
            "perplexity": p,
            "efficacy": e,
            "delta_fro": float(t),
            "retention_neighborhood": 100.0,
            "records": recs[t],
        }
        for t, (p, e) in enumerate(zip(ppl, eff))
    ]


def test_collapse_point_and_claims_follow_the_numbers():
    from pmet.sequential import collapse_point, sequential_claims

    recs = [{}, {str(i): [1.0, 1.0, 1.0] for i in range(10)}, {str(i): [1.0, 1.0, 1.0] for i in range(20)}]
    low = [{}, recs[1], {str(i): [float(i % 2), 0.0, 1.0] for i in range(20)}]
    pmet = _rows("pmet", [10, 11, 12], [None, 100, 100], recs)
    memit = _rows("memit", [10, 11, 25], [None, 100, 50], low)  # perplexity 2.5x at 20 edits
    assert collapse_point(pmet) is None and collapse_point(memit) == 20
    assert collapse_point(memit, ppl_factor=3.0) is None and collapse_point(memit, 3.0, 60.0) == 20
    claims = sequential_claims({"pmet": pmet, "memit": memit})
    line = next(c for c in claims if c.startswith("pmet collapses later than memit"))
    assert "(none within 20 edits vs 20 edits)" in line and "100.0% vs 50.0%" in line and "same 20 edits" in line
    assert "pmet: does not collapse within 20 edits" in claims[1] and "memit: collapses after 20 edits" in claims[2]
