"""Low-rank linear ``y = (x @ a.T) @ b.T + bias``.

Layers of this file, top to bottom (DESIGN.md section 4):
1. Triton kernel(s)            -- not yet: the fused one-launch kernel lands with its own issue;
2. launcher                    -- idem;
3. torch reference             -- :func:`lowrank_linear_reference`, the test oracle and CPU path;
4. autograd Function           -- the reference is differentiable through torch autograd;
5. public functional           -- :func:`lowrank_linear`, which checks inputs and dispatches.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_lowrank_inputs(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise a one-line ValueError when the operands of the low-rank linear do not fit together."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"a must be (rank, in) and b (out, rank); got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features); got a scalar")
    rank, in_features = a.shape
    out_features = b.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but a expects {in_features} (a is {tuple(a.shape)})"
        )
    if b.shape[1] != rank:
        raise ValueError(f"b must be ({out_features}, {rank}) to match a {tuple(a.shape)}; got {tuple(b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},); got {tuple(bias.shape)}")
    operands = {"x": x, "a": a, "b": b} | ({"bias": bias} if bias is not None else {})
    for name, t in operands.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: float32, float16, bfloat16, float64")
    dtypes = {name: t.dtype for name, t in operands.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"x, a, b and bias must share one dtype; got {dtypes}")
    devices = {name: t.device for name, t in operands.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"x, a, b and bias must be on one device; got {devices}")


def lowrank_linear_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch oracle: products in fp32 (fp64 stays fp64), the result cast back to ``x.dtype``.

    Accumulating in fp32 keeps fp16 from overflowing in ``x @ a.T`` when the true result fits.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(compute) @ a.to(compute).T
    y = h @ b.to(compute).T
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def lowrank_linear(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = (x @ a.T) @ b.T + bias`` for x of shape ``(..., in)``, a ``(r, in)``, b ``(out, r)``.

    Differentiable in x, a, b and bias. Rank 0 (``a`` of shape ``(0, in)``) gives the bias
    broadcast (zeros without one).
    """
    check_lowrank_inputs(x, a, b, bias)
    return lowrank_linear_reference(x, a, b, bias)
