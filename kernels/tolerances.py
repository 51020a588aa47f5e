"""Relative Frobenius error bounds of the low-rank kernels against an fp64 reference, per dtype.

Defined once: the kernel tests and the benchmark's correctness check both read :data:`LOWRANK_RTOL`.
fp32 runs true-fp32 dots (a few ulps of accumulated rounding); fp16 / bf16 are dominated by
rounding the inputs' products and the output to 10 / 7 mantissa bits.
"""

from __future__ import annotations

import torch

LOWRANK_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def lowrank_rtol(dtype: torch.dtype) -> float:
    """The bound for ``dtype``; a one-line ValueError for a dtype without one."""
    try:
        return LOWRANK_RTOL[dtype]
    except KeyError:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in LOWRANK_RTOL)
        raise ValueError(f"dtype {dtype} has no low-rank tolerance; allowed: {allowed}") from None
