"""The command line answers user mistakes in one line (exit status 2) and lists what it accepts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pmet.cli import main
from pmet.editing import editor_names

SRC = Path(__file__).resolve().parents[1] / "src"


def _run(*args):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "pmet", *args], capture_output=True, text=True, env=env, timeout=300)


def test_edit_help_lists_every_registered_method():
    out = _run("edit", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps the help text
    for name in editor_names():
        assert name in text, name
    assert "counterfact, zsre" in text


def test_unknown_method_is_one_line_with_the_registered_names():
    out = _run("edit", "--method", "PMET")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "unknown method 'PMET'" in lines[0] and all(n in lines[0] for n in ("ft", "rome", "mend", "pmet"))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["edit", "--dataset", "zsre2"], "unknown dataset 'zsre2'; valid: counterfact, zsre"),
        (["edit", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    ],
)
def test_unknown_dataset_or_model_is_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_method_unavailable_is_one_line_with_its_fix(capsys, tmp_path):
    # MEND on the tiny model has hyperparameters but no trained editor in this fresh cache
    assert (
        main(["edit", "--model", "tiny-llama", "--method", "mend", "--device", "cpu", "--cache-dir", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "no trained MEND editor" in err and "python -m pmet.editing.mend train --model tiny-llama" in err
