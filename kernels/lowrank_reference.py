"""Torch side of the low-rank linear: input checks, the reference (layer 3) and the backward formula.

:func:`lowrank_linear_reference` is the oracle of every kernel test and the CPU path;
:func:`lowrank_backward` serves both autograd paths (eager Function and custom op).
"""

from __future__ import annotations

import torch

from fasttrunc.runs import compute_dtype

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def operands_fit(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The common case of :func:`check_lowrank_inputs`, in few cheap comparisons (eager decode)."""
    if a.dim() != 2 or b.dim() != 2 or x.dim() < 1:
        return False
    dtype, device = x.dtype, x.device
    if dtype not in FLOAT_DTYPES or a.dtype is not dtype or b.dtype is not dtype:
        return False
    if a.device != device or b.device != device or x.shape[-1] != a.shape[1] or b.shape[1] != a.shape[0]:
        return False
    return bias is None or (
        bias.dtype is dtype and bias.device == device and bias.dim() == 1 and bias.shape[0] == b.shape[0]
    )


def check_lowrank_inputs(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise a one-line ValueError (TypeError for a non-tensor) when the operands do not fit together."""
    try:
        fit = operands_fit(x, a, b, bias)
    except AttributeError:  # a non-tensor operand: named below
        fit = False
    if fit:
        if x.device.type == "meta":
            raise ValueError("x, a and b are on the meta device and hold no values; load the weights first")
        return
    operands_given = {"x": x, "a": a, "b": b, "bias": bias}
    for name, t in operands_given.items():
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            allowed = "a torch.Tensor or None" if name == "bias" else "a torch.Tensor"
            raise TypeError(f"{name} must be {allowed}; got {type(t).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a must be (rank, in) and b (out, rank); got a {tuple(a.shape)} and b {tuple(b.shape)}")
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
        if t.dtype not in FLOAT_DTYPES:
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
    compute = compute_dtype(x.dtype)
    h = x.to(compute) @ a.to(compute).T
    y = h @ b.to(compute).T
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def lowrank_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    has_bias: bool,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``y = (x @ a.T) @ b.T + bias`` for x, a, b, bias, in fp32 like the reference.

    Torch GEMMs: of the five products only the tiny M x r ones could fuse, and cuBLAS runs the
    large ones at its best, so a Triton backward does not pay here.
    """
    compute = compute_dtype(x.dtype)
    k = a.shape[1]
    n = b.shape[0]
    g = grad_y.reshape(-1, n).to(compute)
    x2 = x.reshape(-1, k).to(compute)
    ac, bc = a.to(compute), b.to(compute)
    grad_h = g @ bc  # (M, r)
    grad_x = (grad_h @ ac).to(x.dtype).reshape(x.shape) if needs[0] else None
    grad_a = (grad_h.T @ x2).to(a.dtype) if needs[1] else None
    grad_b = (g.T @ (x2 @ ac.T)).to(b.dtype) if needs[2] else None
    grad_bias = g.sum(0).to(grad_y.dtype) if (has_bias and needs[3]) else None
    return grad_x, grad_a, grad_b, grad_bias
