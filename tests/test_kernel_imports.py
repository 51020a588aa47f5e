"""Importing the kernels imports no triton: the jit modules load on the first launch only."""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = """
import json, sys
import fasttrunc
first = {"torch": "torch" in sys.modules, "triton": "triton" in sys.modules}
import fasttrunc.kernels, fasttrunc.kernels.lowrank, fasttrunc.kernels.svd, fasttrunc.kernels.lowrank_plan
after = {"triton": "triton" in sys.modules, "jit": [m for m in sys.modules if m.endswith(("_lowrank_triton", "_svd_triton"))]}
print(json.dumps({"fasttrunc": first, "kernels": after}))
"""


def test_importing_the_kernels_imports_no_triton():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    assert seen["fasttrunc"] == {"torch": False, "triton": False}
    assert seen["kernels"] == {"triton": False, "jit": []}
