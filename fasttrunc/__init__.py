"""fasttrunc: low-rank weight truncation of transformers, fast.

Public API (DESIGN.md section 3): :class:`TruncatedLinear`, :func:`truncate_`, :class:`Targets`,
:class:`Truncation`, :func:`truncated_svd`, :func:`lowrank_linear`, :func:`resolve_rank`,
:func:`save_truncated`, :func:`load_truncated`.

Names are resolved on first use (PEP 562), so ``import fasttrunc`` and ``fasttrunc --help`` do
not pay for importing torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "FAMILIES": "fasttrunc.families",
    "Family": "fasttrunc.families",
    "describe_targets": "fasttrunc.describe",
    "Factors": "fasttrunc.truncation",
    "factorize": "fasttrunc.truncation",
    "Targets": "fasttrunc.truncation",
    "Truncation": "fasttrunc.truncation",
    "replace_modules_": "fasttrunc.truncation",
    "resolve_targets": "fasttrunc.truncation",
    "truncate_": "fasttrunc.truncation",
    "TruncatedLinear": "fasttrunc.linear",
    "lowrank_linear": "fasttrunc.kernels.lowrank",
    "resolve_rank": "fasttrunc.ranks",
    "truncated_svd": "fasttrunc.svd",
    "load_truncated": "fasttrunc.io",
    "save_truncated": "fasttrunc.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fasttrunc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from fasttrunc.describe import describe_targets
    from fasttrunc.families import FAMILIES, Family
    from fasttrunc.io import load_truncated, save_truncated
    from fasttrunc.kernels.lowrank import lowrank_linear
    from fasttrunc.linear import TruncatedLinear
    from fasttrunc.ranks import resolve_rank
    from fasttrunc.svd import truncated_svd
    from fasttrunc.truncation import (
        Factors,
        Targets,
        Truncation,
        factorize,
        replace_modules_,
        resolve_targets,
        truncate_,
    )
