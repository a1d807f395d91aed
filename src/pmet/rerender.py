"""Re-execute rendered notebooks with the parameters they were rendered with.

papermill writes the parameters of a run into the executed notebook (``metadata.papermill.parameters``).
:func:`rerender` reads them back and runs the source notebook again with exactly those, so the committed
copies in ``notebooks/rendered/`` (and the figures and tables they write) are regenerated as they were made,
reusing every cache (``./run.sh rerender`` or ``python -m pmet rerender``). A rendering that wrote into the
repository (no ``out_dir`` recorded) is run with ``overwrite=True``: regenerating the committed artifacts is
what was asked (without it a notebook writes into a fresh ``out/`` folder; :mod:`pmet.notebook`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .paths import REPO_ROOT

RENDERED = REPO_ROOT / "notebooks" / "rendered"
KERNEL = "pmet"  # the notebooks' metadata.kernelspec; ./run.sh setup registers it for the clone's .venv


def notebook_kernel(name: str = KERNEL) -> str:
    """The Jupyter kernel to execute the notebooks with: ``name`` when it is registered, else ``python3`` (the
    running environment's default kernel), with a message saying so; papermill would fail on a missing one."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
        return name
    except NoSuchKernel:
        print(
            f"Jupyter kernel {name!r} is not registered (./run.sh setup registers it); using 'python3'", file=sys.stderr
        )
        return "python3"


def recorded_run(rendered: str | Path) -> tuple[Path, dict]:
    """The source notebook and the parameters papermill recorded in ``rendered``.

    The source is looked up by name in the folder above ``rendered`` (``notebooks/rendered/x.ipynb`` ->
    ``notebooks/<input name>``), so the recorded input path's working directory does not matter."""
    rendered = Path(rendered)
    meta = json.loads(rendered.read_text()).get("metadata", {}).get("papermill")
    if not meta or not meta.get("input_path"):
        raise ValueError(f"{rendered} was not written by papermill (no metadata.papermill.input_path)")
    source = rendered.resolve().parent.parent / Path(meta["input_path"]).name
    if not source.exists():
        raise FileNotFoundError(f"{rendered} was rendered from {meta['input_path']}, which is not at {source}")
    return source, dict(meta.get("parameters") or {})


def _short(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def command_line(source: Path, rendered: Path, params: dict) -> str:
    """The equivalent papermill command (paths relative to the working directory where possible)."""
    return f"papermill {_short(source)} {_short(rendered)} --cwd {_short(source.parent)} -y '{json.dumps(params)}'"


def rerender(paths=None, dry_run: bool = False, progress: bool = True) -> list[tuple[Path, Path, dict]]:
    """Run each rendered notebook's source again with its recorded parameters, overwriting the rendered copy.

    ``paths``: rendered notebooks (default: every ``notebooks/rendered/*.ipynb`` of the checkout).
    ``dry_run``: only print the papermill commands. Returns ``(source, rendered, parameters)`` per notebook.
    """
    paths = [Path(p) for p in paths] if paths else sorted(RENDERED.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no rendered notebooks given and none in {RENDERED}")
    runs = [(*recorded_run(p), p) for p in paths]  # every file checked before the first (long) run
    done = []
    for source, params, rendered in runs:
        if params.get("out_dir") in (None, ""):
            params = {**params, "overwrite": True}
        print(command_line(source, rendered, params), flush=True)
        if not dry_run:
            import papermill

            papermill.execute_notebook(
                str(source),
                str(rendered),
                parameters=params,
                cwd=str(source.parent),
                progress_bar=progress,
                kernel_name=notebook_kernel(),
            )
        done.append((source, rendered, params))
    return done
