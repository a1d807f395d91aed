"""Small helpers shared by the test modules (importable as ``helpers``: pytest puts tests/ on sys.path)."""

import torch


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Exact copies of every parameter of ``model`` (to compare before / after an edit)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
