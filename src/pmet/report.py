"""Writing the paper's artifacts: tables as CSV + Markdown + LaTeX, figures as PNG + PDF, and the
notebook configuration switch for CI.

Every table carries a caption that states the model, the number of edits and the number of evaluated
records, and every written file is listed in a ``manifest.json`` beside it (what made it, when, with
which parameters), so a figure can be traced back to the run that produced it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from .paths import REPO_ROOT, in_source_checkout

SMALL_ENV = "PMET_NOTEBOOK_SMALL"


def configure(params: dict, small: dict | None = None, names: list[str] | None = None) -> SimpleNamespace:
    """Resolve a notebook's parameters.

    ``params`` is the notebook's ``globals()`` after the papermill ``parameters`` cell; ``names`` picks
    which entries are parameters (default: every lower-case non-module value defined there). When the
    environment variable ``PMET_NOTEBOOK_SMALL=1`` is set (CI), ``small`` overrides them and ``out_dir``
    becomes a fresh temporary directory, so CI runs are fast and never overwrite committed results.
    """
    import types

    keys = names or [k for k, v in params.items() if not k.startswith("_") and k.islower()
                     and not isinstance(v, (types.ModuleType, types.FunctionType, type)) and k not in ("In", "Out")]
    cfg = {k: params[k] for k in keys if k in params}
    if os.environ.get(SMALL_ENV) == "1":
        cfg.update(small or {})
        cfg["out_dir"] = tempfile.mkdtemp(prefix="pmet-nb-")
        cfg["small"] = True
    else:
        cfg.setdefault("small", False)
    if cfg.get("out_dir") in (None, ""):
        cfg["out_dir"] = str(REPO_ROOT if in_source_checkout() else Path.cwd())
    print("configuration:", ", ".join(f"{k}={v!r}" for k, v in cfg.items()))
    return SimpleNamespace(**cfg)


def _record(out: Path, files: list[Path], meta: dict) -> None:
    manifest = out / "manifest.json"
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for f in files:
        data[str(f.relative_to(out))] = {"written": stamp, **meta}
    manifest.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


def save_table(df: pd.DataFrame, name: str, out_dir: str | Path, caption: str, meta: dict | None = None) -> list[Path]:
    """Write ``tables/<name>.{csv,md,tex}``; the caption goes into the Markdown and LaTeX versions."""
    out = Path(out_dir)
    tdir = out / "tables"
    tdir.mkdir(parents=True, exist_ok=True)
    paths = [tdir / f"{name}.csv", tdir / f"{name}.md", tdir / f"{name}.tex"]
    df.to_csv(paths[0], index=False)
    paths[1].write_text(f"{caption}\n\n{markdown_table(df)}\n")
    latex = df.to_latex(index=False, escape=True, caption=caption, label=f"tab:{name}")
    paths[2].write_text(latex)
    _record(out, paths, {"caption": caption, **(meta or {})})
    return paths


def save_figure(fig, name: str, out_dir: str | Path, meta: dict | None = None) -> list[Path]:
    """Write ``figures/<name>.png`` (150 dpi) and ``.pdf``."""
    out = Path(out_dir)
    fdir = out / "figures"
    fdir.mkdir(parents=True, exist_ok=True)
    paths = [fdir / f"{name}.png", fdir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _record(out, paths, meta or {})
    return paths


def fmt_ci(mean: float, half_width: float | None, digits: int = 1) -> str:
    """``"99.5 (0.1)"`` as in the paper's tables (mean and 95% CI half-width)."""
    if mean is None or pd.isna(mean):
        return "n/a"
    if half_width is None or pd.isna(half_width):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({half_width:.{digits}f})"
