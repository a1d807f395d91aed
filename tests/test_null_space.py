"""Null-space projection (AlphaEdit) as a switch of the shared editor: pmet-ns, memit-ns."""

import pytest
import torch

from pmet.editing import edit, load_hparams
from pmet.editing.core import null_space_projector, solve_update_null_space
from pmet.editing.hparams import EditHparams
from pmet.experiments import _hparams_id

REQ = {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "Paris"}
TINY_NS = {"null_space_threshold": 1e-4, "null_space_alpha": 1e-2}  # the tiny models' keys are ~100x small


pytestmark = pytest.mark.usefixtures("one_thread")


def _second_moment(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """E[kk^T] of keys with a decaying spectrum (a few large directions, many small ones)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -4, d, dtype=torch.float64)
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    return k.T @ k / n


def _preserved_basis(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(C0.double())
    return evecs[:, evals >= threshold]


# ---------------------------------------------------------------------------------------------- pure math
def test_projector_is_an_orthogonal_projection_that_kills_the_preserved_span():
    C0 = _second_moment(24, 500)
    thr = 1e-3
    P = null_space_projector(C0, thr)
    U0 = _preserved_basis(C0, thr)
    assert 0 < U0.shape[1] < 24  # both spaces non-trivial
    assert torch.allclose(P, P.T, atol=1e-12) and torch.allclose(P @ P, P, atol=1e-10)
    assert (P @ U0).abs().max() < 1e-10
    assert abs(float(torch.trace(P)) - (24 - U0.shape[1])) < 1e-8  # rank = null-space dimension


@pytest.mark.parametrize("with_prior", [False, True])
def test_null_space_update_leaves_preserved_keys_unchanged(with_prior):
    g = torch.Generator().manual_seed(1)
    d_out, d_in, n = 9, 24, 4
    C0 = _second_moment(d_in, 500)
    P = null_space_projector(C0, 1e-3)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    K1 = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    Kp = torch.randn(d_in, 6, generator=g, dtype=torch.float64)
    prior = Kp @ Kp.T if with_prior else None
    alpha = 0.5
    delta = solve_update_null_space(R, K1, P, alpha, prior)
    U0 = _preserved_basis(C0, 1e-3)
    assert (delta @ U0).norm() <= 1e-10 * delta.norm()  # Δ k0 = 0 on the preserved span
    # AlphaEdit's closed form: Δ (M P + αI) = R K1^T P with M = Kp Kp^T + K1 K1^T
    M = K1 @ K1.T + (prior if prior is not None else 0)
    lhs = delta @ (M @ P + alpha * torch.eye(d_in, dtype=torch.float64))
    assert (lhs - R @ K1.T @ P).norm() <= 1e-9 * (R @ K1.T @ P).norm()


def test_bad_inputs_are_one_line_errors():
    C0 = _second_moment(8, 50)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        null_space_projector(C0, 0.0)
    with pytest.raises(ValueError, match="square"):
        null_space_projector(torch.zeros(3, 4), 1e-3)
    P = null_space_projector(C0, 1e-3)
    with pytest.raises(ValueError, match="P must be"):
        solve_update_null_space(torch.zeros(2, 1), torch.zeros(5, 1), P, 1.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        solve_update_null_space(torch.zeros(2, 1), torch.zeros(8, 1), P, 0.0)
    with pytest.raises(ValueError, match="null_space_threshold"):
        EditHparams(null_space_threshold=-1.0)


# ---------------------------------------------------------------------------------------------- hparams
def test_null_space_fields_leave_existing_cache_keys_alone():
    for method in ("pmet", "memit"):
        hp = load_hparams(method, "tiny-llama")
        d = hp.to_dict()
        assert not {"null_space", "null_space_threshold", "null_space_alpha"} & set(d)
        ns = load_hparams(f"{method}-ns", "tiny-llama")
        assert ns.null_space and ns.to_dict()["null_space"] is True
        assert _hparams_id(ns) != _hparams_id(hp)
        # the ns variant reads the same file and switches as its base method
        assert {k: v for k, v in ns.to_dict().items() if k not in ("method", "null_space")} == {
            k: v for k, v in d.items() if k != "method"
        }


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("name,method", [("tiny-llama", "pmet-ns"), ("tiny-gptj", "memit-ns")])
def test_null_space_edit_succeeds_and_preserves_keys(tiny_models, tmp_cache, name, method):
    model, tok = tiny_models[name]
    prompt = REQ["prompt"].format(REQ["subject"])
    target = tok(" " + REQ["target_new"], add_special_tokens=False)["input_ids"][0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = edit(model, tok, [REQ], method=method, hparams=TINY_NS, progress=False)
    try:
        with torch.no_grad():
            top = int(model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax())
        assert top == target
        assert result.hparams.null_space and result.method == method
        for w, delta in result.deltas.items():
            U0 = _preserved_basis(result.stats[w], TINY_NS["null_space_threshold"])
            assert U0.shape[1] > 0
            W1 = model.get_parameter(w).detach().double()
            W0 = before[w].double()
            # the preserved keys' outputs: W1 k0 == W0 k0 to float32 precision of the stored weights
            change = (W1 @ U0 - W0 @ U0).norm()
            assert change <= 1e-5 * (W0 @ U0).norm() + 1e-6, w
            assert delta.norm() > 0
    finally:
        result.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_prior_keys_need_the_null_space_switch(tiny_models, tmp_cache):
    model, tok = tiny_models["tiny-llama"]
    with pytest.raises(ValueError, match="prior_keys are used by the null-space solve only"):
        edit(model, tok, [REQ], method="pmet", prior_keys={}, progress=False)
