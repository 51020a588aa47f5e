"""`bash benchmarks/gpu_check.sh --dry-run OUT`: the one GPU script, run on the CPU (interpreter, tiny shapes).

The script a GPU run depends on must not break unnoticed on a machine that has no GPU: every
stage (install check, tests, low-rank table, rSVD table, sweep start, the recall toy's paper
stage at toy size) runs and writes its output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = "tests,lowrank,svd,sweep,paper"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets it for the dry run itself
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--stages", ALL_STAGES, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    status = (out / "status.txt").read_text() if (out / "status.txt").exists() else ""
    assert proc.returncode == 0, (status, proc.stdout[-2000:], proc.stderr[-2000:])
    stages = [line.split()[0] for line in status.splitlines()]
    # The cost model's calibration runs right after the low-rank table.
    assert stages == ["tests", "lowrank", "calibrate", "svd", "sweep", "paper"], status
    assert all(" exit 0 " in line for line in status.splitlines()), status
    env_txt = (out / "env.txt").read_text()
    assert "triton" in env_txt and "cpu (Triton interpreter)" in env_txt
    lowrank = json.loads((out / "lowrank.json").read_text())
    assert lowrank["rows"] and all(row["correct"] for row in lowrank["rows"])
    assert "| shape |" in (out / "lowrank.txt").read_text()
    # The interpreter times no graph replay: nothing to fit, the current model printed back.
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["points"] == 0 and calibration["fitted"] == calibration["start"]
    assert "fitted: LowrankCostModel(" in (out / "calibration.txt").read_text()
    svd = json.loads((out / "svd" / "results.json").read_text())
    assert svd["rows"] and all(row["error_ratio"] < 1.5 for row in svd["rows"] if row["k"] is not None)
    assert "passed" in (out / "tests.txt").read_text()
    recall = json.loads((out / "recall" / "results.json").read_text())
    assert recall["config"]["steps"] == 3 and recall["cells"], "the paper stage ran the recall toy"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages", "tests,warp", "OUT"], "stage warp is not a stage; allowed: tests, lowrank, svd, sweep, paper"),
        (["--fast", "OUT"], "unknown option --fast"),
    ],
)
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_refuses_bad_options(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
