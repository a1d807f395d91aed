"""The editor registry: every editing method, its hyperparameters and how to run it, in one place.

Each editor is one :class:`EditorSpec`: its name (as experiments and the CLI spell it), the label tables
show, its hyperparameter dataclass and file family, the fields the method fixes over its file (PMET's
ablations are the shared editor with switches), its apply function and its flags (``sequential``: edits one
request after another, as ROME; ``artifact_id``: identity of a trained artifact the editor loads, as MEND's
hypernetwork). :func:`edit`, :func:`load_hparams`, the CLI, :mod:`pmet.experiments`, :mod:`pmet.claims`
and :mod:`pmet.report` ask this module; adding an editor is one :func:`register` call at the bottom.

``"none"`` (:data:`UNEDITED`) is not an editor: experiments use it for the unedited row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ft, mend, rome
from .editor import apply_shared_editor
from .hparams import METHOD_SWITCHES, EditHparams, field_names, find_hparams_file, read_hparams_file
from .result import EditResult, MethodUnavailable

UNEDITED = "none"
SEQUENTIAL_OPTIONS = ("on_step", "checkpoint", "checkpoint_every")


@dataclass(frozen=True)
class EditorSpec:
    """One registered editor (module docstring)."""

    name: str
    label: str  # as tables show it
    hparams_cls: type
    apply: Callable[..., EditResult]  # apply(model, tok, requests, hparams, cache_dir=, progress=, **options)
    file_base: str  # hyperparameter file family (pmet.editing.hparams.find_hparams_file)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # fields the method sets over its file
    sequential: bool = False  # applies the requests one after another (accepts on_step / checkpoint)
    artifact_id: Callable[..., str] | None = None  # (model, hparams, cache_dir) -> "" or an identity suffix

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options ``apply`` takes besides ``cache_dir`` and ``progress``."""
        params = list(inspect.signature(self.apply).parameters)[4:]
        return tuple(p for p in params if p not in ("cache_dir", "progress"))


EDITORS: dict[str, EditorSpec] = {}


def register(spec: EditorSpec) -> EditorSpec:
    """Add an editor (its name must be new)."""
    if spec.name in EDITORS or spec.name == UNEDITED:
        raise ValueError(f"editor {spec.name!r} is already registered")
    EDITORS[spec.name] = spec
    return spec


def editor_names() -> tuple[str, ...]:
    """The registered methods, in the paper's table order."""
    return tuple(EDITORS)


def get_editor(method: str) -> EditorSpec:
    """The spec of ``method``; an unknown name raises one :class:`ValueError` listing the registered ones."""
    try:
        return EDITORS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown editing method {method!r}; registered: {', '.join(EDITORS)}") from None


def sequential_methods() -> tuple[str, ...]:
    """The editors that apply their requests one after another (ROME)."""
    return tuple(n for n, s in EDITORS.items() if s.sequential)


def display_label(method: str) -> str:
    """How tables show ``method`` (``"Unedited"`` for :data:`UNEDITED`; unknown names as they are)."""
    if method == UNEDITED:
        return "Unedited"
    spec = EDITORS.get(method)
    return spec.label if spec is not None else method


def display_labels() -> dict[str, str]:
    """``{method: label}`` for the unedited row and every editor, in the paper's table order."""
    return {UNEDITED: display_label(UNEDITED), **{n: s.label for n, s in EDITORS.items()}}


# ------------------------------------------------------------------------------------ hyperparameters
def hparams_path(method: str, model: Any = "default", dataset: str = "counterfact") -> Path:
    """The JSON file :func:`load_hparams` reads for ``method`` on ``model``/``dataset``; none raises
    :class:`MethodUnavailable` (a FileNotFoundError: tables show the row as unavailable)."""
    spec = get_editor(method)
    path, name = find_hparams_file(method, model, dataset, base=spec.file_base)
    if path is None:
        raise MethodUnavailable(f"no {method} hyperparameter file for {name}/{dataset} (pmet/editing/hparams/)")
    return path


def _all_fields() -> set[str]:
    return set().union(*(field_names(s.hparams_cls) for s in EDITORS.values()))


def load_hparams(
    method: str = "pmet",
    model: Any = "default",
    dataset: str = "counterfact",
    overrides: Mapping[str, Any] | None = None,
    *,
    only_where_present: bool = False,
    **more,
):
    """The one hyperparameter loader: ``method``'s dataclass on ``model`` (a registry name or a loaded
    model) and ``dataset`` (``"counterfact"`` or ``"zsre"``).

    Values come from the method's file (:func:`hparams_path`), then the fields the method fixes (PMET's
    ablations: their switches), then ``overrides`` and ``**more`` (single fields). An override no
    registered editor knows (a misspelling) always raises :class:`ValueError` naming the valid fields; one
    that exists for other editors but not for ``method`` raises too, unless ``only_where_present=True``
    (the caller's overrides apply only where the field exists, e.g. ``v_autocast`` for every editor of a
    table: PMET, MEMIT and ROME optimise value vectors, FT-W and MEND do not).
    """
    spec = get_editor(method)
    if not isinstance(dataset, str):
        raise TypeError(
            f"dataset must be a name such as 'counterfact' or 'zsre', not {type(dataset).__name__} "
            "(overrides are the fourth argument)"
        )
    cls = spec.hparams_cls
    valid = field_names(cls)
    path = hparams_path(method, model, dataset)
    values = read_hparams_file(path)
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"{path}: unknown hyperparameter(s) {unknown}; known: {sorted(valid)}")
    values.update(spec.fixed)
    given = {**(overrides or {}), **more}
    unknown = sorted(set(given) - valid)
    if unknown:
        misspelled = sorted(set(unknown) - _all_fields())
        if misspelled or not only_where_present:
            where = (
                "no editor has them"
                if misspelled
                else "they belong to other editors; pass only_where_present=True to skip them"
            )
            raise ValueError(
                f"unknown hyperparameter(s) {misspelled or unknown} for {method} ({where}); valid "
                f"fields of {cls.__name__}: {', '.join(sorted(valid))}"
            )
        given = {k: v for k, v in given.items() if k in valid}
    values.update(given)
    return cls(**values)


hparams_for = load_hparams  # the name notebooks and scripts use


def resolve_hparams(method: str, model: Any, hparams=None, dataset: str = "counterfact"):
    """``hparams`` as ``method``'s dataclass: an instance is used as given, ``None`` loads the file, a dict
    is a set of overrides of the file (:func:`load_hparams`)."""
    spec = get_editor(method)
    if isinstance(hparams, spec.hparams_cls):
        return hparams
    if hparams is None or isinstance(hparams, Mapping):
        return load_hparams(method, model, dataset, hparams)
    raise TypeError(
        f"hparams for {method} must be {spec.hparams_cls.__name__}, a dict of overrides or None, "
        f"not {type(hparams).__name__}"
    )


# ------------------------------------------------------------------------------------------ editing
def edit(
    model,
    tok,
    requests,
    method: str = "pmet",
    hparams=None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **options,
) -> EditResult:
    """Edit ``model`` in place with ``method`` so that each request's prompt continues with its ``target_new``;
    ``result.restore()`` puts the original weights back bit for bit.

    ``method``: a registered editor (:func:`editor_names`): ``"pmet"``, ``"memit"``, ``"memit-ffn"`` (MEMIT's
    value on m^L: the post-norm adaptation), ``"pmet-no-attn-delta"``, ``"pmet-with-attn-weights"``,
    ``"pmet-even-spread"``, ``"pmet-ns"``/``"memit-ns"`` (null-space projection; memit-ns is AlphaEdit), or
    a baseline ``"rome"``, ``"ft"`` (FT-W), ``"mend"``. ``hparams``: the method's
    dataclass (used as given), a dict of overrides of its file, or None (:func:`resolve_hparams`; CounterFact
    files). ``cache_dir``: context templates, key statistics and value vectors (default
    ``$PMET_CACHE_DIR``). ``options``: what the editor's apply function takes besides those, e.g.
    ``use_value_cache`` (PMET/MEMIT), ``on_step(k, partial)``, ``checkpoint`` and ``checkpoint_every``
    (sequential editors: :func:`pmet.editing.rome.apply_rome`), ``editor`` (MEND); None values are ignored.
    """
    spec = get_editor(method)
    options = {k: v for k, v in options.items() if v is not None}
    seq = [k for k in options if k in SEQUENTIAL_OPTIONS]
    if seq and not spec.sequential:
        raise ValueError(
            f"{', '.join(seq)}: only for sequential editors ({', '.join(sequential_methods())}); "
            f"{method!r} edits all requests at once"
        )
    bad = sorted(set(options) - set(spec.options))
    if bad:
        raise TypeError(f"{method} takes no option(s) {bad}; its options: {', '.join(spec.options) or 'none'}")
    hp = resolve_hparams(method, model, hparams)
    return spec.apply(model, tok, requests, hp, cache_dir=cache_dir, progress=progress, **options)


# -------------------------------------------------------------------------- the registered editors
# In the paper's table order (Table 1's rows, then Table 3's ablations).
register(EditorSpec("ft", "FT-W", ft.FTHparams, ft.apply_ft, file_base="ft"))
register(EditorSpec("mend", "MEND", mend.MendHparams, mend.apply_mend, file_base="mend", artifact_id=mend.artifact_id))
register(EditorSpec("rome", "ROME", rome.RomeHparams, rome.apply_rome, file_base="rome", sequential=True))
_SHARED_LABELS = {
    "memit": "MEMIT",
    "memit-ffn": "MEMIT (δ on m^L)",
    "pmet": "PMET",
    "pmet-no-attn-delta": "w/o δ^a",
    "pmet-with-attn-weights": "w/ W_O^MHSA",
    "pmet-even-spread": "Even spread",
}
for _name, _label in _SHARED_LABELS.items():
    register(
        EditorSpec(
            _name,
            _label,
            EditHparams,
            apply_shared_editor,
            file_base="memit" if _name.startswith("memit") else "pmet",
            fixed={"method": _name, **METHOD_SWITCHES[_name]},
        )
    )
# beyond the paper: PMET and MEMIT with AlphaEdit's null-space projection (memit-ns is AlphaEdit)
for _base, _label in (("pmet", "PMET-ns"), ("memit", "MEMIT-ns (AlphaEdit)")):
    register(
        EditorSpec(
            f"{_base}-ns",
            _label,
            EditHparams,
            apply_shared_editor,
            file_base=_base,
            fixed={"method": f"{_base}-ns", **METHOD_SWITCHES[_base], "null_space": True},
        )
    )
