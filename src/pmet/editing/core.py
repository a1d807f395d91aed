"""The closed-form pieces of PMET/MEMIT as small pure functions (no model in here).

Shapes follow the paper: a weight is ``W`` of shape ``[d_out, d_in]`` with ``v = W k``; the ``n`` edited
keys and residuals are stacked as *columns*, ``K1: [d_in, n]``, ``R: [d_out, n]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def solve_update(R: torch.Tensor, K1: torch.Tensor, C0: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 9: ``Δ = R K1^T (λ C0 + K1 K1^T)^{-1}`` in float64, with ``C0 = E[k k^T]`` (λ applied here).

    Solved as ``A X = K1`` with ``A = λC0 + K1 K1^T`` symmetric, so ``Δ = R X^T``; no explicit inverse
    (MEMIT uses ``torch.linalg.solve`` the same way; the authors' PMET code calls ``torch.inverse``).
    ``Δ`` is the minimiser of Eq. 8 given the residual: it satisfies the normal equations
    ``Δ (λC0 + K1 K1^T) = R K1^T``. Returns ``[d_out, d_in]`` float64 on ``R``'s device.
    """
    if R.dim() != 2 or K1.dim() != 2 or R.shape[1] != K1.shape[1]:
        raise ValueError(f"R must be [d_out, n] and K1 [d_in, n]; got {tuple(R.shape)} and {tuple(K1.shape)}")
    if C0.shape != (K1.shape[0], K1.shape[0]):
        raise ValueError(f"C0 must be [d_in, d_in] = {(K1.shape[0],) * 2}; got {tuple(C0.shape)}")
    dev = R.device
    R, K1, C0 = R.double(), K1.double().to(dev), C0.double().to(dev)
    A = lam * C0 + K1 @ K1.T
    X = torch.linalg.solve(A, K1)  # A^{-1} K1
    return R @ X.T


def spread_factor(L: int, l: int, mode: str = "sqrt") -> float:
    """The divisor of Eq. 11 for layer ``l`` when ``L`` is the last critical layer: ``sqrt(L-l+1)`` (PMET)
    or ``L-l+1`` (MEMIT, ``mode="even"``)."""
    n = L - l + 1
    if n < 1:
        raise ValueError(f"layer l={l} must not be after the last critical layer L={L}")
    if mode == "sqrt":
        return math.sqrt(n)
    if mode == "even":
        return float(n)
    raise ValueError(f"spread mode must be 'sqrt' or 'even', not {mode!r}")


def spread_residual(R: torch.Tensor, L: int, l: int, mode: str = "sqrt") -> torch.Tensor:
    """Eq. 11: ``R^l = R / sqrt(L-l+1)`` (PMET, ``mode="sqrt"``) or ``R / (L-l+1)`` (MEMIT, ``"even"``).

    The editor passes *positions in the list of critical layers* (``L = len(layers)-1``, ``l = i``), which
    is the paper's formula for contiguous layers and the authors' code (``len(layers) - i``) always.
    """
    return R / spread_factor(L, l, mode)


def compute_keys(
    prompt_keys: torch.Tensor, group_sizes: Sequence[int] | None = None, averaging: str = "groups"
) -> torch.Tensor:
    """Eq. 12: average ``prev(W, pref_j ⊕ S)`` over the ``P`` context-prefixed prompts of each request.

    ``prompt_keys``: ``[n, P, d_in]`` (request, prompt, key). ``averaging="uniform"`` is Eq. 12 as
    written (``1/P Σ_j``). ``averaging="groups"`` is the authors' implementation (MEMIT ``compute_ks``,
    reused by PMET): the prompts come in groups (``[["{}"], 5 generated prefixes]``, ``group_sizes=[1, 5]``)
    and the key is the mean of the per-group means, so the unprefixed prompt weighs 1/2, not 1/6.
    Returns ``[n, d_in]``.
    """
    if prompt_keys.dim() != 3:
        raise ValueError(f"prompt_keys must be [n, P, d_in], got {tuple(prompt_keys.shape)}")
    P = prompt_keys.shape[1]
    if averaging == "uniform" or not group_sizes:
        return prompt_keys.mean(1)
    if averaging != "groups":
        raise ValueError(f"averaging must be 'groups' or 'uniform', not {averaging!r}")
    if sum(group_sizes) != P:
        raise ValueError(f"group sizes {list(group_sizes)} do not add up to the {P} prompts")
    means, start = [], 0
    for g in group_sizes:
        means.append(prompt_keys[:, start : start + g].mean(1))
        start += g
    return torch.stack(means, 1).mean(1)


def residual(values: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``R = V1 - W0 K1`` with the values and the current outputs given as rows ``[n, d_out]``;
    returns columns ``[d_out, n]`` (the paper's layout) in float64."""
    if values.shape != current.shape:
        raise ValueError(f"values {tuple(values.shape)} and current outputs {tuple(current.shape)} differ")
    return (values.double() - current.double().to(values.device)).T


# ---- null-space projection (AlphaEdit; Fang et al., ICLR 2025) -----------------------------------------
def null_space_projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's projection ``P = Û Ûᵀ`` onto the (approximate) null space of the preserved keys: ``Û`` are
    the eigenvectors of ``C0 = E[k kᵀ]`` (the key second moment, *without* λ) whose eigenvalues are below
    ``threshold``. For every key ``k0`` in the span of the other eigenvectors ``P k0 = 0``, so an update of
    the form ``Δ = X P`` leaves ``W k0`` unchanged (AlphaEdit, Sec. 3.1).

    As AlphaEdit's code (``get_project``: the SVD of the ``mom2`` statistic, ``nullspace_threshold`` 2e-2 for
    GPT-J and Llama3-8B) the threshold is absolute, so it depends on the scale of the model's keys; we use
    ``eigh`` in float64 (equal to the SVD of a symmetric positive semi-definite matrix). Returns ``[d, d]``
    float64 on ``C0``'s device."""
    if C0.dim() != 2 or C0.shape[0] != C0.shape[1]:
        raise ValueError(f"C0 must be a square [d, d] matrix; got {tuple(C0.shape)}")
    if not threshold > 0:
        raise ValueError(f"the null-space threshold must be > 0, not {threshold!r}")
    C = C0.double()
    evals, evecs = torch.linalg.eigh((C + C.T) / 2)
    U = evecs[:, evals < threshold]
    return U @ U.T


def solve_update_null_space(
    R: torch.Tensor, K1: torch.Tensor, P: torch.Tensor, alpha: float, prior_gram: torch.Tensor | None = None
) -> torch.Tensor:
    """AlphaEdit's closed form in place of Eq. 9: ``Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + αI)^{-1}``.

    ``P`` is :func:`null_space_projector` of ``C0``; ``prior_gram = Kp Kpᵀ`` the keys of earlier edits of a
    sequential run (AlphaEdit's sequential form, its ``cache_c``; None in a single edit); ``α`` the
    regulariser (AlphaEdit's ``L2``, 10 in its GPT-J/Llama3 files). The preserved-knowledge term ``λ C0`` of
    Eq. 9 is gone: ``P`` replaces it. Since ``(M P + αI)(I - P) = α (I - P)`` for ``M = Kp Kpᵀ + K1 K1ᵀ`` and
    ``P² = P``, ``Δ (I - P) = 0``: ``Δ k0 = 0`` for every key ``k0`` with ``P k0 = 0``, whatever ``R``.

    Solved as AlphaEdit's code does, ``Δᵀ = (P M + αI)^{-1} P K1 Rᵀ`` (one ``torch.linalg.solve``), here in
    float64. Shapes as :func:`solve_update`; returns ``[d_out, d_in]`` float64 on ``R``'s device."""
    if R.dim() != 2 or K1.dim() != 2 or R.shape[1] != K1.shape[1]:
        raise ValueError(f"R must be [d_out, n] and K1 [d_in, n]; got {tuple(R.shape)} and {tuple(K1.shape)}")
    d = K1.shape[0]
    if P.shape != (d, d):
        raise ValueError(f"P must be [d_in, d_in] = {(d, d)}; got {tuple(P.shape)}")
    if prior_gram is not None and prior_gram.shape != (d, d):
        raise ValueError(f"prior_gram must be [d_in, d_in] = {(d, d)}; got {tuple(prior_gram.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, not {alpha!r}")
    dev = R.device
    R, K1, P = R.double(), K1.double().to(dev), P.double().to(dev)
    M = K1 @ K1.T
    if prior_gram is not None:
        M = M + prior_gram.double().to(dev)
    A = P @ M + alpha * torch.eye(d, dtype=torch.float64, device=dev)
    return torch.linalg.solve(A, P @ K1 @ R.T).T
