"""Kernels of fasttrunc: each Triton kernel sits beside the torch reference it must match.

Nothing here touches the GPU or imports triton at import time; :func:`use_triton` decides, per
call, whether a tensor goes to a Triton kernel or to the torch reference.
"""

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
