"""The experiment commands' shared behaviour: --out checked before any work, one-line errors, a light import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fasttrunc.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        ["run", "recall", "--steps", "3"],
        ["run", "memory", "--d", "8", "--n-tokens", "4", "--steps", "2", "--record-every", "1"],
        ["run", "pythia", "--model", "nowhere/x/y", "--layer", "0", "--matrix", "mlp_in", "--rank", "0"],
        ["sweep", "pythia", "--model", "nowhere/x/y"],
    ],
)
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, command):
    target = tmp_path / "results"
    target.write_text("not a directory")
    result = runner.invoke(app, command + ["--out", str(target)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is not a directory" in lines[0]
    assert target.read_text() == "not a directory"


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--steps", "0"], "steps 0"),
        (["--checkpoints", "5,x"], "checkpoints '5,x'"),
        (["--steps", "4", "--checkpoints", "2,9"], "checkpoint step 9"),
    ],
)
def test_make_tiny_neox_bad_options_exit_2_with_one_line(tmp_path, extra, words):
    result = runner.invoke(app, ["make-tiny-neox", str(tmp_path / "model")] + extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and words in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists()  # nothing was trained or written


def test_cli_import_loads_no_torch():
    code = "import sys, fasttrunc.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
