"""Autograd of the low-rank linear (layer 4): the eager Function and the custom op for torch.compile.

Both run the Triton forward and :func:`~fasttrunc.kernels.lowrank_reference.lowrank_backward`.
The custom op ``fasttrunc::lowrank_linear`` (opaque to the compiler, with a fake implementation
for tracing and a registered backward) plans with the default tunables: a schema cannot carry a
dataclass.
"""

from __future__ import annotations

from typing import Any

import torch

from fasttrunc.kernels._lowrank_launch import lowrank_linear_triton
from fasttrunc.kernels.lowrank_plan import LowrankTunables
from fasttrunc.kernels.lowrank_reference import lowrank_backward


class LowRankLinearFunction(torch.autograd.Function):
    """Eager autograd path: the Triton forward plus :func:`lowrank_backward`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        bias: torch.Tensor | None,
        tunables: LowrankTunables,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, a, b)
        ctx.has_bias = bias is not None
        return lowrank_linear_triton(x, a, b, bias, tunables)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, a, b = ctx.saved_tensors
        return (*lowrank_backward(grad_y, x, a, b, ctx.has_bias, tuple(ctx.needs_input_grad)), None)


@torch.library.custom_op("fasttrunc::lowrank_linear", mutates_args=())
def lowrank_op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return lowrank_linear_triton(x, a, b, bias)


@lowrank_op.register_fake
def _(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], b.shape[0])


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, a, b, bias = inputs
    ctx.save_for_backward(x, a, b)
    ctx.has_bias = bias is not None


def _op_backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, a, b = ctx.saved_tensors
    return lowrank_backward(grad_y, x, a, b, ctx.has_bias, tuple(ctx.needs_input_grad))


lowrank_op.register_autograd(_op_backward, setup_context=_op_setup_context)
