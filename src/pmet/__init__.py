"""pmet: Precise Model Editing in a Transformer (PMET), its baselines, evaluation and the paper's artifacts."""

from .editing import EditHparams, EditResult, edit, load_hparams
from .editing.saved import SavedEdit, SavedEditError, load_edit, save_edited_model
from .layouts import Layout, layout_for
from .models import ModelUnavailableError, list_models, load_model

__version__ = "0.1.0"
__all__ = [
    "Layout",
    "layout_for",
    "load_model",
    "list_models",
    "ModelUnavailableError",
    "edit",
    "EditResult",
    "EditHparams",
    "load_hparams",
    "load_edit",
    "SavedEdit",
    "SavedEditError",
    "save_edited_model",
    "__version__",
]
