"""Model editing: PMET (Eqs. 8-12), MEMIT and the ablations of Table 3, as one editor with switches.

>>> from pmet import load_model
>>> from pmet.editing import edit
>>> model, tok = load_model("smollm2")
>>> result = edit(model, tok, [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
...                             "target_new": "English"}], method="pmet")
>>> result.restore()
"""

from .core import compute_keys, solve_update, spread_factor, spread_residual
from .context import get_context_templates
from .editor import (BASELINES, EditResult, MethodUnavailable, collect_keys, current_outputs, edit, hparams_for,
                     normalize_requests)
from .hparams import METHODS, EditHparams, hparams_path, load_hparams
from .partial_forward import forward_from_layer
from .values import compute_values, value_loss

__all__ = [
    "edit", "EditResult", "hparams_for", "BASELINES", "MethodUnavailable", "EditHparams", "load_hparams",
    "hparams_path", "METHODS",
    "solve_update", "spread_residual", "spread_factor", "compute_keys", "collect_keys", "current_outputs",
    "compute_values", "value_loss", "forward_from_layer", "get_context_templates", "normalize_requests",
]
