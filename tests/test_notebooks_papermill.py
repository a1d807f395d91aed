"""Run notebooks through papermill with explicit small parameters and check the files they write.

nbval (in ``./run.sh test``) checks that every notebook executes; this test checks what a notebook run
*produces*: the table files (CSV + Markdown + LaTeX, expected columns and rows, no missing numbers) and
the figure files (PNG + PDF), written into a temporary ``out_dir`` and never into the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pmet.rerender import notebook_kernel

papermill = pytest.importorskip("papermill")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _run(name: str, tmp_path: Path, monkeypatch, **params) -> Path:
    # the explicit parameters below are what is tested: the CI switch must not replace them
    monkeypatch.delenv("PMET_NOTEBOOK_SMALL", raising=False)
    out = tmp_path / "out"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(tmp_path / f"{name}.ipynb"),
        parameters={**params, "out_dir": str(out), "cache_dir": str(tmp_path / "cache")},
        cwd=str(NOTEBOOKS),
        progress_bar=False,
        kernel_name=notebook_kernel(),
    )
    return out


def _numbers(cell) -> float:
    """The mean of a table cell such as ``"81.5 (4.2)"``."""
    return float(str(cell).split()[0])


def test_table1_papermill_writes_complete_tables(tmp_path, monkeypatch):
    out = _run(
        "table1",
        tmp_path,
        monkeypatch,
        models=["tiny-llama"],
        n_edits=3,
        methods=["none", "memit", "pmet"],
        generation=False,
    )
    stem = out / "tables" / "table1_tiny-llama"
    for ext in ("csv", "md", "tex"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0
    df = pd.read_csv(stem.with_suffix(".csv"), keep_default_na=False)  # "n/a" stays a string
    assert list(df.columns[:7]) == ["Model", "Editor", "Edits", "Score", "Efficacy", "Generalization", "Specificity"]
    assert {"Fluency", "Consistency", "n records"} <= set(df.columns)
    assert len(df) == 3 and list(df["Editor"])[1:] == ["MEMIT", "PMET"]
    assert (df["Edits"] == 3).all()
    for col in ("Score", "Efficacy", "Generalization", "Specificity"):
        values = df[col].map(_numbers)
        assert values.notna().all() and values.between(0, 100).all(), col
    # generation=False: fluency/consistency are explicitly absent, not silently zero
    assert (df["Fluency"] == "n/a").all()
    claims = (out / "tables" / "claims.md").read_text()
    assert "PMET" in claims and "MEMIT" in claims
    manifest = json.loads((out / "tables" / "manifest.json").read_text())
    assert manifest["table1_tiny-llama.csv"]["notebook"] == "table1"


def test_fig4_papermill_writes_figure_and_data(tmp_path, monkeypatch):
    methods = ["pmet", "pmet-with-attn-weights"]
    out = _run(
        "fig4_delta_norms", tmp_path, monkeypatch, model="tiny-gptj", n_edits=2, methods=methods, generation=False
    )
    for ext in ("png", "pdf"):
        assert (out / "figures" / f"fig4_delta_norms_tiny-gptj.{ext}").stat().st_size > 1000
    df = pd.read_csv(out / "tables" / "fig4_delta_norms_tiny-gptj.csv")
    assert list(df.columns) == ["method", "weight", "layer", "norm", "label"]
    assert not df.isna().any().any()
    assert (df["norm"] > 0).all()
    # PMET updates only W_O^FFN of each critical layer; the "w/ W_O^MHSA" ablation also W_O^MHSA
    per_method = df.groupby("method")["weight"].agg(set).to_dict()
    assert per_method == {"PMET": {"FFN"}, "w/ W_O^MHSA": {"FFN", "MHSA"}}
    assert len(df[df.method != "PMET"]) == 2 * len(df[df.method == "PMET"])


def test_rerender_repeats_the_recorded_parameters(tmp_path, monkeypatch):
    """``pmet rerender`` runs a rendered notebook's source again with the parameters papermill recorded."""
    from pmet.rerender import recorded_run, rerender

    monkeypatch.delenv("PMET_NOTEBOOK_SMALL", raising=False)
    (tmp_path / "notebooks" / "rendered").mkdir(parents=True)
    source = tmp_path / "notebooks" / "table3.ipynb"
    source.write_text((NOTEBOOKS / "table3.ipynb").read_text())
    rendered = tmp_path / "notebooks" / "rendered" / "table3_tiny.ipynb"
    out = tmp_path / "out"
    params = {
        "model": "tiny-llama",
        "edit_counts": [2],
        "methods": ["pmet", "pmet-even-spread"],
        "generation": False,
        "out_dir": str(out),
        "cache_dir": str(tmp_path / "cache"),
    }
    papermill.execute_notebook(
        str(source),
        str(rendered),
        parameters=params,
        cwd=str(source.parent),
        progress_bar=False,
        kernel_name=notebook_kernel(),
    )
    assert recorded_run(rendered) == (source.resolve(), params)
    table = out / "tables" / "table3_tiny-llama.csv"
    first = table.read_text()
    table.unlink()
    (done,) = rerender([rendered], progress=False)
    assert done[2] == params and table.read_text() == first  # the cached runs give the same table
    assert json.loads(rendered.read_text())["metadata"]["papermill"]["parameters"] == params
    source.with_name("plain.ipynb").write_text(json.dumps({"cells": [], "metadata": {}}))
    with pytest.raises(ValueError, match="not written by papermill"):
        recorded_run(source.with_name("plain.ipynb"))


def _copy_of_repository(tmp_path: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files, committed in a fresh git repository."""
    import shutil
    import subprocess

    root = NOTEBOOKS.parent
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    copy = tmp_path / "repo"
    for f in filter(None, files):
        if (root / f).is_file():
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, copy / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=copy, check=True)
    return copy


def test_a_default_run_leaves_every_committed_file_unchanged(tmp_path, monkeypatch):
    """Issue 21: a notebook run without out_dir/overwrite writes into a fresh, git-ignored out/ folder (with
    its tables, summaries, claims and per-record results) and changes no committed file; writing into the
    repository itself is refused without overwrite."""
    import subprocess

    from pmet.runstore import read_run

    copy = _copy_of_repository(tmp_path)
    monkeypatch.delenv("PMET_NOTEBOOK_SMALL", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(copy / "src"))  # the kernel imports the copy: REPO_ROOT is the copy
    params = {
        "models": ["tiny-llama"],
        "n_edits": 2,
        "methods": ["none", "pmet"],
        "generation": False,
        "cache_dir": str(tmp_path / "cache"),
    }
    nbs = copy / "notebooks"
    papermill.execute_notebook(
        str(nbs / "table1.ipynb"),
        str(tmp_path / "t1.ipynb"),
        parameters=params,
        cwd=str(nbs),
        progress_bar=False,
        kernel_name=notebook_kernel(),
    )
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=copy, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert [s for s in status if s and not s.startswith("!! ")] == []  # nothing committed changed
    (run_out,) = (copy / "out").iterdir()
    assert run_out.name.startswith("table1-")
    assert (run_out / "tables" / "table1_tiny-llama.md").exists() and (run_out / "tables" / "claims.md").exists()
    (stored,) = (run_out / "results" / "tiny-llama" / "counterfact").glob("pmet_n2_seed0_hp*.jsonl.gz")
    run = read_run(stored)
    assert run.spec["method"] == "pmet" and run.spec["n_edits"] == 2 and len(run.rows) == 2
    assert (
        run.summary["efficacy"]
        == json.loads((run_out / "tables" / "table1_tiny-llama.json").read_text())["tiny-llama"]["pmet"]["efficacy"]
    )
    with pytest.raises(papermill.PapermillExecutionError, match="overwrite True"):
        papermill.execute_notebook(
            str(nbs / "table1.ipynb"),
            str(tmp_path / "t2.ipynb"),
            parameters={**params, "out_dir": str(copy)},
            cwd=str(nbs),
            progress_bar=False,
            kernel_name=notebook_kernel(),
        )


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path):
    """``papermill --help-notebook`` lists every parameter of a notebook: papermill's parser skips a line it cannot
    read (an ``=`` inside the comment, say), and that parameter then has no help."""
    from papermill.translators import PythonTranslator

    nb = json.loads(path.read_text())
    (cell,) = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    src = "".join(cell["source"])
    names = [line.split("=")[0].strip() for line in src.splitlines() if line[:1].isalpha() and "=" in line]
    assert names and [p.name for p in PythonTranslator.inspect({"source": src})] == names
