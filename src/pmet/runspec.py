"""What a run is, and every name derived from it: one place for run folders, artifact names and labels.

A :class:`RunSpec` says what one edit-and-evaluate run does: which model, dataset, editor, how many edits,
which sample of records (``seed``), under which precision the value vectors are optimised
(``value_autocast``), whether generation metrics are computed and which further hyperparameter overrides
apply. Experiments (:mod:`pmet.experiments`), notebooks (:mod:`pmet.notebook`), the run cache
(:mod:`pmet.runcache`) and the committed per-record files (:mod:`pmet.runstore`) all take it, and every run
summary carries it as ``summary["spec"]`` -- so the precision or any other variant of a result is read from
its metadata (:func:`spec_of`, :func:`precision_of`, :func:`model_label`), never parsed back from a file name.

Names derived here, and only here:

* the run folder tag ``n{n}_seed{seed}_hp{hparams id}[_gen][_full]`` (:meth:`RunSpec.run_tag`; the same
  string as before this module existed, so existing caches stay valid);
* an artifact's file stem (:func:`artifact_name`), e.g. ``table1_smollm2_bfloat16``;
* a committed per-record file's path (:func:`results_path`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASETS = ("counterfact", "zsre")
PRECISIONS = (None, "bfloat16", "float16")
POOLS = (None, "subset", "full", "extended")
POOL_SUFFIX = {"full": "_full", "extended": "_ext"}  # in run folder and file names; the subset has none
FLOAT32 = "float32"


def check_pool(pool: str | None, dataset: str) -> None:
    """ValueError unless ``pool`` is one of :data:`POOLS` and available for ``dataset`` (the extended pool is
    CounterFact's)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be None, 'subset', 'full' or 'extended', not {pool!r}")
    if pool == "extended" and dataset != "counterfact":
        raise ValueError("the extended pool is CounterFact's (full-field records, then reduced ones)")


@dataclass(frozen=True)
class RunSpec:
    """One run: edit ``n_edits`` records of ``dataset`` (sample ``seed``) with ``method`` on ``model``.

    ``value_autocast``: None (float32, the paper) or ``"bfloat16"``/``"float16"`` -- the precision under which
    ROME, MEMIT and PMET optimise their value vectors (Eq. 10); it reaches only the editors that have values.
    ``overrides``: further hyperparameter overrides (``{"clamp_norm_factor": 0.75}``), kept as sorted pairs
    so a spec is hashable; None values mean "the file's value" and are dropped.
    ``pool``: which records the table draws from -- ``"subset"`` (the offline subsets), ``"full"`` (ROME's
    complete files), ``"extended"`` (the offline full-field records, then reduced ones: runs beyond 1,590
    CounterFact edits without the complete file) or None (decided when the run starts,
    :func:`pmet.experiments.table_selection`; the spec recorded with the result names the pool used).
    """

    model: str
    method: str
    dataset: str = "counterfact"
    n_edits: int = 100
    seed: int = 0
    generation: bool = False
    value_autocast: str | None = None
    overrides: tuple = field(default=())
    pool: str | None = None

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}")
        check_pool(self.pool, self.dataset)
        if self.value_autocast not in PRECISIONS:
            raise ValueError(f"value_autocast must be None, 'bfloat16' or 'float16', not {self.value_autocast!r}")
        if isinstance(self.n_edits, bool) or int(self.n_edits) != self.n_edits or self.n_edits < 1:
            raise ValueError(f"n_edits must be a positive integer, not {self.n_edits!r}")
        over = dict(self.overrides or ())
        if "v_autocast" in over:
            raise ValueError("give the values' precision as value_autocast=..., not as an override")
        object.__setattr__(self, "n_edits", int(self.n_edits))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "generation", bool(self.generation))
        object.__setattr__(self, "overrides", tuple(sorted((k, v) for k, v in over.items() if v is not None)))

    # ---- derived values
    @property
    def precision(self) -> str:
        """``"float32"`` or the autocast dtype of the value optimisation."""
        return self.value_autocast or FLOAT32

    def hparam_overrides(self) -> dict:
        """The overrides handed to the hyperparameter loader (``v_autocast`` only where it is set)."""
        return {**dict(self.overrides), **({"v_autocast": self.value_autocast} if self.value_autocast else {})}

    def run_tag(self, hparams_id: str) -> str:
        """The run folder's name: ``n{n}_seed{seed}_hp{hparams_id}``, plus ``_gen`` with generation, ``_full``
        for the complete files' pool and ``_ext`` for the extended one (full-field + reduced records)."""
        return (
            f"n{self.n_edits}_seed{self.seed}_hp{hparams_id}"
            + ("_gen" if self.generation else "")
            + POOL_SUFFIX.get(self.pool, "")
        )

    def label(self) -> str:
        return model_label(self.model, self.precision)

    def replace(self, **changes) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = dict(self.overrides)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- reading a result's variant from its metadata -------------------------------------------------------
def spec_of(summary: dict) -> dict:
    """The run specification recorded in a run summary, as a dict: ``summary["spec"]`` where present; for a
    summary written before specs were recorded, rebuilt from its fields (model, method, n_edits, seed) and
    the hyperparameter values it carries (``hparams_values["v_autocast"]``)."""
    if isinstance(summary.get("spec"), dict):
        return dict(summary["spec"])
    hp = summary.get("hparams_values") or {}
    return {
        "model": summary.get("model"),
        "method": summary.get("method"),
        "dataset": summary.get("dataset"),
        "n_edits": summary.get("n_edits"),
        "seed": summary.get("seed"),
        "generation": summary.get("generation"),
        "value_autocast": hp.get("v_autocast") or (hp.get("values") or {}).get("v_autocast"),
        "overrides": {},
    }


def precision_of(summary: dict) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"``: the value vectors' precision of the run behind ``summary``."""
    return spec_of(summary).get("value_autocast") or FLOAT32


def precision_of_runs(summaries) -> str:
    """The precision of an artifact made of several runs (``summaries``: run summaries): the one non-float32
    precision among them (editors without value vectors record float32 whatever was asked), ``"float32"`` if
    there is none, ``"mixed"`` if there are two."""
    found = {precision_of(s) for s in summaries if isinstance(s, dict) and "unavailable" not in s} - {FLOAT32}
    return FLOAT32 if not found else found.pop() if len(found) == 1 else "mixed"


def model_label(model: str, precision: str | None = None) -> str:
    """How a model's results are named in tables and claims: ``smollm2`` or ``smollm2 (values bfloat16)``."""
    return model if precision in (None, "", FLOAT32) else f"{model} (values {precision})"


# ---- artifact and result file names ---------------------------------------------------------------------
def artifact_name(artifact: str, models, precision: str | None = None, seed: int = 0, tag: str | None = None) -> str:
    """The file stem of an artifact (table, figure, summaries): ``<artifact>_<model>[_<model>...]``, then
    ``_<precision>`` when the value vectors were not optimised in float32, ``_seed<k>`` for a record sample
    other than seed 0 and ``_<tag>`` when a rendering is given one (e.g. ``n1590``: a second size of an
    artifact kept beside the first). The committed artifacts' names are this function's output for their configurations;
    everything else that distinguishes a configuration (sizes, methods, generation) is recorded in the
    folder's ``manifest.json`` and checked before a file is replaced (:mod:`pmet.notebook`)."""
    models = [models] if isinstance(models, str) else list(models)
    stem = "_".join([artifact, *models])
    if precision not in (None, FLOAT32):
        stem += f"_{precision}"
    if int(seed) != 0:
        stem += f"_seed{int(seed)}"
    if tag:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", str(tag)):
            raise ValueError(f"tag {tag!r}: use letters, digits, '.' and '-' only (it becomes part of file names)")
        stem += f"_{tag}"
    return stem


def results_path(root: str | Path, spec: RunSpec, hparams_id: str) -> Path:
    """Where a run's committed per-record file goes: ``<root>/results/<model>/<dataset>/<method>_<run tag>.jsonl.gz``
    (one file per run; a run that feeds two artifacts -- Table 3 and Fig. 4 -- is one file)."""
    from .runstore import SUFFIX

    return Path(root) / "results" / spec.model / spec.dataset / f"{spec.method}_{spec.run_tag(hparams_id)}{SUFFIX}"


def config_of(**config: Any) -> dict:
    """An artifact's configuration as plain JSON data (sorted keys; tuples become lists), for the manifest."""
    import json

    return json.loads(json.dumps(config, sort_keys=True, default=str))
