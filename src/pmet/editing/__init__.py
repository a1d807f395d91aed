"""Model editing: PMET (Eqs. 8-12), MEMIT and the ablations of Table 3 as one editor with switches, and the
baselines ROME, FT-W and MEND; every editor is registered in :mod:`.registry`.

>>> from pmet import load_model
>>> from pmet.editing import edit
>>> model, tok = load_model("smollm2")
>>> result = edit(model, tok, [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
...                             "target_new": "English"}], method="pmet")
>>> result.restore()
"""

from .context import get_context_templates
from .core import compute_keys, solve_update, spread_factor, spread_residual
from .editor import apply_shared_editor, collect_keys, current_outputs
from .hparams import METHODS, EditHparams
from .partial_forward import forward_from_layer
from .registry import (
    EDITORS,
    UNEDITED,
    EditorSpec,
    display_label,
    edit,
    editor_names,
    get_editor,
    hparams_for,
    hparams_path,
    load_hparams,
    register,
    sequential_methods,
)
from .requests import normalize_requests
from .result import EditResult, MethodUnavailable
from .values import compute_values, value_loss

__all__ = [
    "edit",
    "EditResult",
    "MethodUnavailable",
    "EditHparams",
    "load_hparams",
    "hparams_for",
    "hparams_path",
    "EDITORS",
    "EditorSpec",
    "register",
    "get_editor",
    "editor_names",
    "display_label",
    "sequential_methods",
    "UNEDITED",
    "METHODS",
    "apply_shared_editor",
    "solve_update",
    "spread_residual",
    "spread_factor",
    "compute_keys",
    "collect_keys",
    "current_outputs",
    "compute_values",
    "value_loss",
    "forward_from_layer",
    "get_context_templates",
    "normalize_requests",
]
