"""Where pmet reads data and writes caches (both configurable by environment variables)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # meaningful in a source checkout only


def in_source_checkout() -> bool:
    return (REPO_ROOT / "pyproject.toml").exists()


def shown(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` where it lies inside it (a committed file as ``results/...``), else as given:
    how messages name a file of the repository."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def data_dir() -> Path:
    """``$PMET_DATA_DIR``; else the shared copy ``<repo>/../shared/data`` when it exists; else ``<repo>/data``
    (``~/.cache/pmet/data`` outside a source checkout). Missing files are downloaded there (see pmet.data)."""
    env = os.environ.get("PMET_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for shared in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if shared.is_dir():
            return shared
    return REPO_ROOT / "data" if in_source_checkout() else Path.home() / ".cache" / "pmet" / "data"


def fixtures_data_dir() -> Path | None:
    """The committed test fixtures ``<repo>/tests/fixtures/data`` (small cuts of the shared data, laid out like it;
    see its PROVENANCE.md), or None outside a source checkout. The tests and the notebooks' CI configuration
    read their data there."""
    d = REPO_ROOT / "tests" / "fixtures" / "data"
    return d if (d / "FIXTURES").is_file() else None


def cache_dir() -> Path:
    """``$PMET_CACHE_DIR`` or ``~/.cache/pmet``: key statistics, value vectors, model weight caches."""
    d = Path(os.environ.get("PMET_CACHE_DIR", Path.home() / ".cache" / "pmet")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d
