"""fasttrunc: low-rank weight truncation of transformers, fast.

Public API (DESIGN.md section 3): :class:`TruncatedLinear`, :func:`truncate_`, :class:`Targets`,
:class:`Truncation`, :func:`truncated_svd`, :func:`lowrank_linear`, :func:`resolve_rank`,
:func:`save_truncated`, :func:`load_truncated`.
"""

from fasttrunc.io import load_truncated, save_truncated
from fasttrunc.kernels.lowrank import lowrank_linear
from fasttrunc.linear import TruncatedLinear
from fasttrunc.ranks import resolve_rank
from fasttrunc.svd import truncated_svd
from fasttrunc.truncation import FAMILIES, Family, Targets, Truncation, replace_modules_, resolve_targets, truncate_

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "Family",
    "Targets",
    "TruncatedLinear",
    "Truncation",
    "load_truncated",
    "lowrank_linear",
    "replace_modules_",
    "resolve_rank",
    "resolve_targets",
    "save_truncated",
    "truncate_",
    "truncated_svd",
]
