"""Kernels of fasttrunc: each Triton kernel sits beside the torch reference it must match.

Nothing here touches the GPU or imports triton at import time; :func:`use_triton` decides, per
call, whether a tensor goes to a Triton kernel or to the torch reference.

This directory is the package ``fasttrunc.kernels`` only. Run from the repository root (``python
-m ...``, ``python -c ...``), the root is on ``sys.path`` and the directory would also answer a
top-level ``import kernels``: the name of the hub-kernels package that transformers (>= 5.25)
requires and imports. Imported under that name, this file hands the name to the installed
package (see :func:`_hand_over`); without one it stays an empty module with no version, which
transformers reads as "not installed".
"""

import sys


def _hand_over() -> None:
    """Put the installed top-level ``kernels`` package (the first one on ``sys.path`` outside the
    repository root) in ``sys.modules`` in place of this directory; nothing when there is none."""
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import system returns what sys.modules holds afterwards
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise


if __name__ == "kernels":
    _hand_over()
else:
    from fasttrunc.kernels._backend import BackendError, use_triton
    from fasttrunc.kernels.lowrank import lowrank_linear, lowrank_linear_reference
    from fasttrunc.kernels.svd import randomized_svd_reference

    __all__ = [
        "BackendError",
        "use_triton",
        "lowrank_linear",
        "lowrank_linear_reference",
        "randomized_svd_reference",
    ]
