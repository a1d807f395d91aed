"""Eq. 10 (:func:`pmet.editing.values.value_loss`) on tiny hand-made tensors, computed by hand."""

import math

import torch

from pmet.editing import value_loss


def test_value_loss_matches_a_hand_computation():
    # B=1 request, P=2 prompts; prompt 0 has a 2-token target, prompt 1 a 1-token target; V=2 tokens
    p = torch.tensor([[0.75, 0.25], [0.6, 0.4], [0.2, 0.8]])
    target_logp = p.log()
    tokens = torch.tensor([0, 1, 1])
    prompt = torch.tensor([0, 0, 1])
    request = torch.tensor([0, 0, 0])
    prompt_len = torch.tensor([2.0, 1.0])
    kl_logp = torch.tensor([[0.6, 0.4]]).log()
    kl_ref = torch.tensor([[0.5, 0.5]]).log()
    delta = torch.tensor([[3.0, 4.0]])  # ||δ|| = 5
    init = torch.tensor([[0.0, 2.0]])  # ||init||² = 4
    out = value_loss(
        target_logp,
        tokens,
        prompt,
        request,
        prompt_len,
        kl_logp,
        kl_ref,
        [delta],
        [init],
        phi=0.5,
        mu=2.0,
        weight_decay=0.1,
    )
    nll0 = -(math.log(0.75) + math.log(0.4)) / 2  # mean over the target's tokens
    nll1 = -math.log(0.8)
    nll = (nll0 + nll1) / 2  # (1/P) Σ_j
    kl = 2.0 * (0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5))  # μ · KL(edited || original)
    wd = 0.1 * 5.0 / 4.0
    assert math.isclose(float(out.nll), nll, rel_tol=1e-6)
    assert math.isclose(float(out.kl), kl, rel_tol=1e-5)
    assert math.isclose(float(out.weight_decay), wd, rel_tol=1e-6)
    assert math.isclose(float(out.total), 0.5 * nll + kl + wd, rel_tol=1e-6)
    assert math.isclose(float(out.prob), (math.exp(-nll0) + 0.8) / 2, rel_tol=1e-6)
    assert not bool(out.fit)  # the second token of prompt 0's target (0.4 < 0.6) is not the argmax
    # the target is the argmax everywhere (a tie counts) -> fit; zero KL against itself
    fit = value_loss(
        torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]).log(),
        tokens,
        prompt,
        request,
        prompt_len,
        kl_ref,
        kl_ref,
        [delta],
        [init],
        phi=1.0,
        mu=1.0,
        weight_decay=0.0,
    )
    assert bool(fit.fit) and float(fit.kl) == 0.0 and float(fit.weight_decay) == 0.0


def test_value_loss_sums_deltas_and_keeps_requests_apart():
    # B=2 requests, P=1 prompt each, one-token targets; two δ's (δ^a and δ^m) per request
    target_logp = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).log()
    ones = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = value_loss(
        target_logp,
        torch.tensor([0, 1]),
        torch.tensor([0, 1]),
        torch.tensor([0, 1]),
        torch.tensor([1.0, 1.0]),
        torch.zeros(2, 2),
        torch.zeros(2, 2),
        [ones, 2 * ones],
        [ones, ones],
        phi=torch.tensor([1.0, 0.1]),
        mu=1.0,
        weight_decay=1.0,
    )
    wd = torch.tensor([1.0 + 2.0, 2.0 / 4 + 4.0 / 4])  # ||δ^a||/||init||² + ||δ^m||/||init||²
    torch.testing.assert_close(out.weight_decay, wd)
    torch.testing.assert_close(out.nll, torch.tensor([math.log(2), -math.log(0.75)]))
    torch.testing.assert_close(out.total, torch.tensor([1.0, 0.1]) * out.nll + wd)
    assert out.fit.tolist() == [True, True]
