"""Hyperparameters of the editor: one dataclass for PMET, MEMIT and the ablations, versioned JSON files.

PMET, MEMIT and the ablations of Table 3 are *the same code* with different switches:

========================== ============== =================== =================== ======== =========
method                     value_site     optimize_attn_delta update_attn_weights spread   stop_rule
========================== ============== =================== =================== ======== =========
``pmet``                   components     True                False               sqrt     pmet
``pmet-no-attn-delta``     components     False               False               sqrt     pmet
``pmet-with-attn-weights`` components     True                True                sqrt     pmet
``pmet-even-spread``       components     True                False               even     pmet
``memit``                  block          False               False               even     memit
``memit-ffn``              components     False               False               even     memit
========================== ============== =================== =================== ======== =========

``pmet-ns`` and ``memit-ns`` (= AlphaEdit) are ``pmet`` and ``memit`` with ``null_space=True``: Eq. 9 is
replaced by AlphaEdit's projected solve (:func:`pmet.editing.core.solve_update_null_space`). The null-space
fields are left out of :meth:`EditHparams.to_dict` while they hold their defaults, so the cache keys of every
configuration made before they existed stay the same.

``memit-ffn`` is MEMIT with its value vector moved from the hidden state h^L to the FFN output m^L (δ
added where W_O^FFN writes, no δ^a). On pre-norm blocks (GPT-J, NeoX, Llama) adding δ to m^L adds it to
h^L unchanged, so it differs from MEMIT only in the clamp's reference norm (|m^L| instead of |h^L|) and in
which vector the residual is measured on. On blocks that normalise the FFN output before the residual add
(Gemma-3's post-norms) it is the adaptation that keeps Eq. 9's linear key -> value relation for the edited
weight: MEMIT's hidden-state residual is not something a change of W_O^FFN can write there (TUNING.md).

Every editor's hyperparameters are a frozen dataclass (:class:`EditHparams` here; ``FTHparams``,
``RomeHparams``, ``MendHparams`` beside their editors), read from versioned JSON files in
``pmet/editing/hparams/`` by the one loader, :func:`pmet.editing.registry.load_hparams`. A file is looked
up by :func:`find_hparams_file` in this order (the first that exists wins):

1. ``{method}_{model}_{dataset}.json``  2. ``{base}_{model}_{dataset}.json``  3. ``{base}_{model}.json``
4. ``{base}_{model}_counterfact.json`` (a model tuned on CounterFact only edits zsRE with those values)
5. ``{base}_{family}_{dataset}.json`` / ``{base}_{family}.json`` for ``tiny-*`` models (family ``tiny``)
6. ``{base}_default.json``

where ``base`` is the editor's file family (registered with it): ``memit`` for MEMIT and ``memit-ffn``,
``pmet`` for PMET and its ablations (which read the ``pmet`` files and then apply their switches), the
method itself for a baseline. ``layers: null`` means "the model's ``layout.critical_layers``" (e.g.
smollm2's causal-tracing choice, set in :mod:`pmet.models`). Keys starting with ``_`` are comments;
``version`` is the file format version; any other key the dataclass lacks raises :class:`ValueError`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"
FILE_VERSION = 1

METHOD_SWITCHES: dict[str, dict[str, Any]] = {
    "pmet": dict(
        value_site="components", optimize_attn_delta=True, update_attn_weights=False, spread="sqrt", stop_rule="pmet"
    ),
    "pmet-no-attn-delta": dict(
        value_site="components", optimize_attn_delta=False, update_attn_weights=False, spread="sqrt", stop_rule="pmet"
    ),
    "pmet-with-attn-weights": dict(
        value_site="components", optimize_attn_delta=True, update_attn_weights=True, spread="sqrt", stop_rule="pmet"
    ),
    "pmet-even-spread": dict(
        value_site="components", optimize_attn_delta=True, update_attn_weights=False, spread="even", stop_rule="pmet"
    ),
    "memit": dict(
        value_site="block", optimize_attn_delta=False, update_attn_weights=False, spread="even", stop_rule="memit"
    ),
    "memit-ffn": dict(
        value_site="components", optimize_attn_delta=False, update_attn_weights=False, spread="even", stop_rule="memit"
    ),
}
METHODS = tuple(METHOD_SWITCHES)


@dataclass(frozen=True)
class EditHparams:
    """Every knob of :func:`pmet.editing.edit`. Defaults are PMET's GPT-J CounterFact values (Appendix D)
    except ``mom2_n_tokens``, which is kept CPU-friendly."""

    method: str = "pmet"
    # --- where to edit -----------------------------------------------------------------------------------
    layers: tuple[int, ...] | None = None  # critical layers R; None = model.layout.critical_layers; L = max
    # --- switches (see the table in the module docstring) ------------------------------------------------
    value_site: str = "components"  # "components": δ^a, δ^m on a^L, m^L (PMET); "block": δ on h^L (MEMIT)
    optimize_attn_delta: bool = True  # False = ablation "w/o δ^a"
    update_attn_weights: bool = False  # True = ablation "w/ W_O^MHSA"
    spread: str = "sqrt"  # Eq. 11: "sqrt" (PMET) or "even" (MEMIT)
    stop_rule: str = "pmet"  # "pmet" (Appendix D) or "memit" (loss < loss_stop only)
    # --- value optimisation (Eq. 10) ---------------------------------------------------------------------
    v_lr: float = 0.2
    v_num_grad_steps: int = 30
    clamp_norm_factor: float = 0.75
    v_weight_decay: float = 0.5
    kl_factor: float = 1.0  # μ
    nll_loss_factor: float = 1.0  # φ (initial)
    phi_after_fit: float = 0.1  # φ once the target is the argmax everywhere (paper: 0.1, authors: 0.1·φ)
    kl_stop: float = 0.01  # stop when μ·KL <= kl_stop after the fit (authors compare the weighted term)
    loss_stop: float = 5e-2  # MEMIT's early stop (the authors' PMET code keeps it too)
    kl_prompt: str = "{} is a"
    v_batch_size: int = 16  # requests optimised together (fast path)
    v_autocast: str | None = None  # "bfloat16": Eq. 10's forward/backward under torch.autocast (None: float32)
    v_fast: bool = False  # prefix run once, finished requests leave the batch (pmet.editing.values); rounding only
    # --- context templates (prefixes of Eqs. 10 and 12) ---------------------------------------------------
    context_length: int = 10  # tokens per generated prefix, start word included (MEMIT: max_out_len=10)
    context_n_per_start: int = 1  # MEMIT: 5 generations over 5 start words
    context_seed: int = 0
    key_averaging: str = "groups"  # "groups" (MEMIT compute_ks: mean of per-group means) or "uniform" (Eq. 12)
    # --- update (Eq. 9) ----------------------------------------------------------------------------------
    mom2_update_weight: float = 6000.0  # λ
    mom2_n_tokens: int = 100_000
    mom2_dtype: str = "float32"
    mom2_corpus: str = "wikitext"
    # --- null-space projection (AlphaEdit; methods pmet-ns, memit-ns) --------------------------------------
    null_space: bool = False  # Δ projected onto the null space of C0 (pmet.editing.core.solve_update_null_space)
    null_space_threshold: float = 2e-2  # eigenvalues of E[kk^T] below it span the null space (AlphaEdit's)
    null_space_alpha: float = 10.0  # α of AlphaEdit's (… + αI)^{-1} (its "L2")

    def __post_init__(self):
        checks = {
            "value_site": ("components", "block"),
            "spread": ("sqrt", "even"),
            "stop_rule": ("pmet", "memit"),
            "key_averaging": ("groups", "uniform"),
            "mom2_dtype": ("float32", "float64"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"EditHparams.{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.value_site == "block" and (self.optimize_attn_delta or self.update_attn_weights):
            raise ValueError(
                "value_site='block' (MEMIT) has no attention delta and no attention values: "
                "set optimize_attn_delta=False and update_attn_weights=False"
            )
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(int(l) for l in self.layers)))
            if not self.layers:
                raise ValueError("EditHparams.layers must be None or a non-empty list of layer indices")
        if "{}" not in self.kl_prompt:
            raise ValueError("kl_prompt must contain '{}' for the subject")
        if self.v_autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"EditHparams.v_autocast must be None, 'bfloat16' or 'float16', not {self.v_autocast!r}")
        if not isinstance(self.v_fast, bool):
            raise ValueError(f"EditHparams.v_fast must be True or False, not {self.v_fast!r}")
        if not (self.null_space_threshold > 0 and self.null_space_alpha > 0):
            raise ValueError("EditHparams.null_space_threshold and null_space_alpha must be > 0")
        if self.v_num_grad_steps < 1 or self.v_batch_size < 1:
            raise ValueError("v_num_grad_steps and v_batch_size must be >= 1")

    def with_method(self, method: str) -> EditHparams:
        """A copy with ``method``'s switches (see :data:`METHOD_SWITCHES`)."""
        return replace(self, method=method, **_switches(method))

    def to_dict(self) -> dict:
        """All fields, except those added after the first release while they keep their neutral default
        (:data:`LATER_FIELDS`), so the cache keys of runs made before such a field existed stay valid."""
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        for name, neutral in LATER_FIELDS.items():
            if d.get(name) == neutral:
                d.pop(name)
        return d


# fields added after the first release -> their neutral default (left out of to_dict and cache keys)
LATER_FIELDS = {
    "v_autocast": None,
    "null_space": False,
    "null_space_threshold": 2e-2,
    "null_space_alpha": 10.0,
    "v_fast": False,
}


def _switches(method: str) -> dict:
    if method not in METHOD_SWITCHES:
        raise ValueError(f"unknown editing method {method!r}; known: {', '.join(METHODS)}")
    return METHOD_SWITCHES[method]


def read_hparams_file(path: Path) -> dict:
    """The fields of a hyperparameter file: ``_comment`` keys and ``version`` dropped (an unsupported
    version raises :class:`ValueError`)."""
    d = json.loads(Path(path).read_text())
    if d.get("version", FILE_VERSION) != FILE_VERSION:
        raise ValueError(f"{path}: hparams file version {d.get('version')} not supported (expected {FILE_VERSION})")
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "version"}


def field_names(cls) -> set[str]:
    """The field names of a hyperparameter dataclass."""
    return {f.name for f in fields(cls)}


def _candidates(method: str, model_name: str, dataset: str, base: str) -> list[str]:
    names = [
        f"{method}_{model_name}_{dataset}",
        f"{base}_{model_name}_{dataset}",
        f"{base}_{model_name}",
        f"{base}_{model_name}_counterfact",
    ]
    if model_name.startswith("tiny-"):
        names += [f"{base}_tiny_{dataset}", f"{base}_tiny"]
    names.append(f"{base}_default")
    return list(dict.fromkeys(names))


def find_hparams_file(
    method: str, model: Any, dataset: str = "counterfact", base: str | None = None
) -> tuple[Path | None, str]:
    """``(path, model name)``: the first existing of ``{method}_{model}_{dataset}``, ``{base}_{model}_{dataset}``,
    ``{base}_{model}``, ``{base}_{model}_counterfact``, ``{base}_tiny[_{dataset}]`` (tiny-* models),
    ``{base}_default`` (``.json`` in :data:`HPARAMS_DIR`), or ``None``. A model tuned on CounterFact only
    (smollm2, gemma3-270m) thus edits zsRE with its own CounterFact values rather than the GPT-J defaults:
    the norms, λ and clamp that fit a model's width matter more than the dataset. ``base`` is the file
    family: ``"memit"`` for MEMIT and ``memit-ffn``, ``"pmet"`` for PMET and its ablations (the default),
    the method itself for a baseline."""
    name = model if isinstance(model, str) else getattr(model, "pmet_name", None) or "default"
    base = base or ("memit" if method.startswith("memit") else "pmet")
    for cand in _candidates(method, name, dataset, base):
        p = HPARAMS_DIR / f"{cand}.json"
        if p.exists():
            return p, name
    return None, name
