"""Importing the kernels imports no triton: the jit modules load on the first launch only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]

# Run from the repository root, whose `kernels/` directory would also answer `import kernels`.
_TOP_LEVEL = """
import importlib.machinery, json, os, sys
root = os.path.realpath(os.getcwd())
installed = importlib.machinery.PathFinder.find_spec(
    "kernels", [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
)
import kernels
print(json.dumps({
    "installed": None if installed is None else os.path.realpath(installed.origin),
    "imported": os.path.realpath(kernels.__file__),
    "version": getattr(kernels, "__version__", None),
    "fasttrunc_names": hasattr(kernels, "lowrank_linear"),
}))
"""


def test_top_level_kernels_from_the_repository_root_is_the_installed_package():
    """Hazard: run from the root (`python -m pytest`, `python -c`), `import kernels` found this
    directory and transformers >= 5.25, which imports the hub-kernels package under that name,
    failed on every model import. The name goes to the installed package (none: an empty module)."""
    proc = subprocess.run([sys.executable, "-c", _TOP_LEVEL], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    assert not seen["fasttrunc_names"]
    if seen["installed"] is None:
        assert seen["imported"] == str(ROOT / "kernels" / "__init__.py") and seen["version"] is None
    else:
        assert seen["imported"] == seen["installed"] != str(ROOT / "kernels" / "__init__.py")
    # Without any installed package (sys.path cut down to the root and the standard library):
    # the directory stays an empty module with no version, which transformers reads as absent.
    script = "import sys, os; sys.path[:] = [os.getcwd()] + [p for p in sys.path if 'site-packages' not in p]\n"
    script += _TOP_LEVEL
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    assert seen["installed"] is None and seen["version"] is None and not seen["fasttrunc_names"]


def test_transformers_models_import_from_the_repository_root():
    code = "from transformers import GPTNeoXConfig, GPTNeoXForCausalLM\nimport fasttrunc.kernels\n"
    code += "GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,"
    code += " intermediate_size=32, vocab_size=40))\nprint(fasttrunc.kernels.lowrank_linear.__module__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "fasttrunc.kernels.lowrank"
