"""The notebooks' setup in one call, and outputs that never replace a result made with another configuration.

Each notebook has a papermill ``parameters`` cell and then::

    cfg = setup(globals(), "table1", small=SMALL)

which resolves the parameters (JSON text from ``papermill -p`` becomes lists/dicts; with
``PMET_NOTEBOOK_SMALL=1``, CI, the notebook's ``SMALL`` configuration replaces them and everything goes to a
fresh temporary folder with its own cache), points ``PMET_DATA_DIR``/``PMET_CACHE_DIR`` at ``data_dir``/
``cache_dir``, seeds torch, sets its threads, and chooses where outputs go (:func:`resolve_out_dir`):

* ``out_dir`` given: there;
* ``overwrite=True`` (``./run.sh rerender`` passes it): the repository itself -- ``tables/``, ``figures/``,
  ``results/`` -- i.e. the committed artifacts are regenerated;
* otherwise a fresh, git-ignored ``out/<notebook>-<time>/`` folder of the checkout, printed at the start.

Outputs are declared as artifacts (:meth:`Notebook.artifact`): the file stem is derived from the run
specification in one place (:func:`pmet.runspec.artifact_name`) and the whole configuration (models, dataset,
sizes, methods, precision, generation, seed, ...) is recorded beside every file in its folder's
``manifest.json``. A file that exists and was made with another configuration is never replaced unless
``overwrite=True``: the notebook stops before running anything, with a one-line :class:`OutputExists` saying
how to write elsewhere or overwrite. The per-record results of every run behind an artifact go to
``<out>/results/<model>/<dataset>/<method>_<run tag>.jsonl.gz`` (:mod:`pmet.runstore`), and ``tables/claims.md``
is rebuilt in the repository only when ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from .paths import REPO_ROOT, fixtures_data_dir, in_source_checkout
from .runspec import RunSpec, artifact_name, config_of, results_path

SMALL_ENV = "PMET_NOTEBOOK_SMALL"
# parameters that change how or where a notebook runs, not what it computes (not part of a configuration)
RUNTIME = {
    "device",
    "data_dir",
    "cache_dir",
    "out_dir",
    "overwrite",
    "threads",
    "batch_size",
    "max_batch",
    "small",
    "reuse_committed",
}
OUT_FOLDER = "out"


class OutputExists(RuntimeError):
    """A run would replace an output made with another configuration (the message says what to do)."""


# ---- parameters --------------------------------------------------------------------------------------------
def configure(params: dict, small: dict | None = None, names: list[str] | None = None) -> SimpleNamespace:
    """Resolve a notebook's parameters (no side effects; :func:`setup` is the notebooks' entry point).

    ``params`` is the notebook's ``globals()`` after the papermill ``parameters`` cell; ``names`` picks
    which entries are parameters (default: every lower-case non-module value defined there). When the
    environment variable ``PMET_NOTEBOOK_SMALL=1`` is set (CI), ``small`` overrides them and ``out_dir``
    becomes a fresh temporary directory (with its own cache, so nothing is reused from earlier runs), so CI
    runs are fast, honest and never overwrite committed results; ``data_dir``, unless given, becomes the
    committed test fixtures (:func:`pmet.paths.fixtures_data_dir`), so CI needs no data beside the checkout.
    """
    simple = (str, int, float, bool, list, tuple, dict, type(None))
    keys = names or [
        k
        for k, v in params.items()
        if not k.startswith("_") and k.islower() and isinstance(v, simple) and k not in ("In", "Out")
    ]
    cfg = {k: _literal(params[k]) for k in keys if k in params}
    if os.environ.get(SMALL_ENV) == "1":
        cfg.update(small or {})
        cfg["out_dir"] = tempfile.mkdtemp(prefix="pmet-nb-")
        cfg["cache_dir"] = os.path.join(cfg["out_dir"], "cache")  # CI recomputes everything it shows
        fixtures = fixtures_data_dir()
        if not cfg.get("data_dir") and fixtures is not None:
            cfg["data_dir"] = str(fixtures)  # CI reads the committed fixtures: nothing needed beside the checkout
        cfg["small"] = True
    else:
        cfg.setdefault("small", False)
    cfg.setdefault("overwrite", False)
    cfg["overwrite"] = _flag(cfg["overwrite"])
    return SimpleNamespace(**cfg)


def _flag(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _literal(value):
    """A list or dict given as JSON text (``papermill -p models '["smollm2", "gemma3-270m"]'`` passes the
    string as it is; ``-y`` passes YAML) becomes that list or dict; anything else is returned unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"a notebook parameter looks like a JSON list/dict but is not one: {value!r} ({exc}); "
                "write it as JSON, or pass it with papermill's -y as YAML"
            ) from None
    return value


def resolve_out_dir(out_dir, overwrite: bool, notebook: str) -> Path:
    """Where a notebook writes (see module docstring): ``out_dir``; the repository with ``overwrite``; else a
    fresh ``out/<notebook>-<time>/`` (in the checkout, else in the working directory)."""
    if out_dir not in (None, ""):
        return Path(out_dir)
    root = REPO_ROOT if in_source_checkout() else Path.cwd()
    if overwrite:
        return root
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / OUT_FOLDER / f"{notebook}-{stamp}"
    k = 1
    while path.exists():
        path, k = root / OUT_FOLDER / f"{notebook}-{stamp}-{k}", k + 1
    return path


def setup(params: dict, notebook: str, small: dict | None = None, names: list[str] | None = None) -> Notebook:
    """A notebook's whole setup (see module docstring); returns its :class:`Notebook` (the parameters as
    attributes, e.g. ``cfg.model``, plus the output methods)."""
    import warnings

    cfg = configure(params, small, names)
    # without ipywidgets tqdm falls back to plain text bars (what papermill --log-output shows); no need to warn
    warnings.filterwarnings("ignore", message="IProgress not found")
    if getattr(cfg, "data_dir", None):
        os.environ["PMET_DATA_DIR"] = str(cfg.data_dir)
    if getattr(cfg, "cache_dir", None):
        os.environ["PMET_CACHE_DIR"] = str(cfg.cache_dir)
    import torch

    if getattr(cfg, "threads", None):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(getattr(cfg, "seed", 0) or 0))
    nb = Notebook(notebook, vars(cfg))
    print("configuration:", ", ".join(f"{k}={v!r}" for k, v in vars(cfg).items() if k != "out_dir"))
    print(
        f"outputs go to {nb.out_dir}"
        + (" (overwrite=True: replacing committed artifacts)" if nb.writes_repository else "")
    )
    return nb


# ---- outputs ---------------------------------------------------------------------------------------------
def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


class Notebook(SimpleNamespace):
    """The resolved parameters of one notebook run (attributes) and where/how it writes."""

    def __init__(self, notebook: str, params: dict):
        super().__init__(**params)
        self.notebook = notebook
        self.out_dir = str(resolve_out_dir(params.get("out_dir"), params.get("overwrite", False), notebook))
        if self.writes_repository and not self.overwrite:
            raise OutputExists(
                f"out_dir {self.out_dir} is the repository: its committed artifacts are regenerated "
                "only with -p overwrite True (or ./run.sh rerender); write elsewhere with "
                "-p out_dir DIR"
            )

    @property
    def writes_repository(self) -> bool:
        return in_source_checkout() and Path(self.out_dir).resolve() == REPO_ROOT.resolve()

    def config(self) -> dict:
        """The parameters that decide what is computed (everything but :data:`RUNTIME`)."""
        return config_of(**{k: v for k, v in vars(self).items() if k not in RUNTIME and k != "notebook"})

    def artifact(
        self, kind: str, models, precision: str | None = None, seed: int = 0, parts=("",), tag=None, **config
    ) -> Artifact:
        """Declare an output: its name from :func:`pmet.runspec.artifact_name`, its configuration = the
        notebook's parameters updated with ``config`` (resolved sizes etc.). Checked at once (before any run):
        an existing file of this artifact made with another configuration raises :class:`OutputExists` unless
        ``overwrite``.
        ``parts``: suffixes of the artifact's further files (``"_curve"``, ``"_example0"``); ``tag``: appended
        to the name (a notebook's ``tag`` parameter, for a second rendering beside a committed one)."""
        name = artifact_name(kind, models, precision, seed, tag)
        art = Artifact(self, name, config_of(**{**self.config(), "notebook": self.notebook, **config}))
        for part in parts:
            art.check(part)
        return art

    def save_runs(self, summaries) -> list[Path]:
        """Write the per-record results of every run in ``summaries`` (any nesting of dicts of run summaries)
        to ``<out>/results/...`` (:func:`pmet.runspec.results_path`) with :func:`pmet.runstore.write_run`."""
        from .diagnostics import attach, read_run_diagnostics
        from .experiments import spec_records
        from .runcache import records_in_order, run_folder
        from .runstore import write_run

        written = []
        for s in _summaries_in(summaries):
            spec = RunSpec.from_dict(s["spec"])
            hp_id = s["hparams"]
            case_ids = [r.case_id for r in spec_records(spec)[0]]
            folder = run_folder(spec, hp_id)
            rows = attach(records_in_order(folder, case_ids), read_run_diagnostics(folder))  # + value diagnostics
            head = {**spec.to_dict(), "hparams_id": hp_id, "hparams_values": s.get("hparams_values")}
            written.append(write_run(results_path(self.out_dir, spec, hp_id), head, s, rows))
        return written

    def write_claims(self):
        """Rebuild ``tables/claims.md`` of the output folder (in the repository: only with ``overwrite``)."""
        from .claims import write_claims

        return write_claims(self.out_dir)

    def finish(self) -> None:
        print(f"outputs written to {self.out_dir}")


def _summaries_in(obj):
    if isinstance(obj, dict):
        if "spec" in obj and "hparams" in obj and "unavailable" not in obj:
            yield obj
            return
        for v in obj.values():
            yield from _summaries_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _summaries_in(v)


class Artifact:
    """One declared output (tables, figures and summaries named ``<name><part>``) and its configuration."""

    TABLE_EXT = (".csv", ".md", ".tex", ".json")
    FIGURE_EXT = (".png", ".pdf")

    def __init__(self, nb: Notebook, name: str, config: dict):
        self.nb, self.name, self.config = nb, name, config

    def _paths(self, part: str) -> list[Path]:
        out = Path(self.nb.out_dir)
        return [out / "tables" / f"{self.name}{part}{e}" for e in self.TABLE_EXT] + [
            out / "figures" / f"{self.name}{part}{e}" for e in self.FIGURE_EXT
        ]

    def check(self, part: str = "", paths=None) -> None:
        """Raise :class:`OutputExists` if a file of this artifact exists, made with another configuration."""
        if self.nb.overwrite:
            return
        for path in paths or self._paths(part):
            if not path.exists():
                continue
            entry = _manifest(path.parent).get(path.name) or {}
            if entry.get("config") != self.config:
                raise OutputExists(
                    f"{path} exists and was made with another configuration; write elsewhere with "
                    f"-p out_dir DIR (default: a fresh out/ folder), or replace it with -p overwrite True"
                )

    def meta(self, extra: dict | None = None) -> dict:
        return {"notebook": self.nb.notebook, "config": self.config, **(extra or {})}

    def save_table(self, df, caption: str, part: str = "", meta: dict | None = None) -> list[Path]:
        from .report import save_table

        name = self.name + part
        out = Path(self.nb.out_dir)
        self.check(paths=[out / "tables" / f"{name}{e}" for e in (".csv", ".md", ".tex")])
        return save_table(df, name, out, caption, self.meta(meta))

    def save_csv(self, df, part: str, meta: dict | None = None) -> Path:
        """A plain CSV (no caption), e.g. per-fact data, recorded in the manifest like the tables."""
        from .report import _record

        path = Path(self.nb.out_dir) / "tables" / f"{self.name}{part}.csv"
        self.check(paths=[path])
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        _record(path.parent, [path], self.meta(meta))
        return path

    def save_figure(self, fig, part: str = "", meta: dict | None = None) -> list[Path]:
        from .report import save_figure

        name = self.name + part
        out = Path(self.nb.out_dir)
        self.check(paths=[out / "figures" / f"{name}{e}" for e in self.FIGURE_EXT])
        return save_figure(fig, name, out, self.meta(meta))

    def save_summaries(self, obj) -> Path:
        """The raw run summaries (``tables/<name>.json``, read by :mod:`pmet.claims`)."""
        from .claims import save_summaries
        from .report import _record

        out = Path(self.nb.out_dir)
        self.check(paths=[out / "tables" / f"{self.name}.json"])
        path = save_summaries(obj, self.name, out)
        _record(path.parent, [path], self.meta())
        return path
