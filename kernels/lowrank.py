"""Low-rank linear ``y = (x @ a.T) @ b.T + bias``: the public functional (layer 5) and its layers.

The five layers of DESIGN.md section 4, one module each:
1. ``_lowrank_triton``   -- the ``@triton.jit`` kernels (tiled; split-K shrink + expand), imported
                           on the first launch only;
2. ``lowrank_plan``      -- the planner, a pure function of shapes, dtype, SM count and a frozen
                           :class:`LowrankTunables`;
   ``lowrank_cost``      -- the cost model the planner chooses by on CUDA, and its fit;
   ``_lowrank_launch``   -- prepared launches per call key, per-launch workspace, the light eager
                           launch path, the device guard;
3. ``lowrank_reference`` -- input checks, the torch reference (test oracle, CPU path), the backward;
4. ``_lowrank_autograd`` -- ``torch.autograd.Function`` and the ``fasttrunc::lowrank_linear``
                           custom op for ``torch.compile``;
5. this module           -- :func:`lowrank_linear`, which dispatches through ``_backend.use_triton``.

Which path serves a call (numbers from benchmarks/BASELINES.md, H200, bf16; no GPU has timed the
kernels yet, so the thresholds are a design, checked by ``benchmarks/gpu_check.sh``):
- ``r (in + out) >= in * out`` (``dense_is_cheaper``): the factors hold more elements than the
  rank-r weight ``W = b @ a``, so ``F.linear(x, W)`` moves fewer bytes and does fewer FLOPs at
  every M. Inference keeps ``W`` beside ``a`` (recomputed when ``a`` or ``b`` change in place or
  are replaced; freed with ``a``), at the memory cost of one dense weight per such layer;
  with gradients ``W`` is formed in the autograd graph each call.
- otherwise, on CUDA, the scheme with the lowest cost-model estimate: split-K (two launches,
  shrink then expand, sharing only a workspace allocated for that call), the tiled kernel (one
  launch), or torch's two GEMMs; by the rules (the interpreter, or ``cost_model=None``) split-K
  for ``M <= 256`` and tiled above; ranks above 1024: torch's two GEMMs always.
- a repeated eager inference call (same ``_lowrank_launch.signature``) takes the bound launch:
  no checks, no planning, the compiled runners called directly (``_lowrank_launch.run_bound``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from fasttrunc.kernels import _lowrank_autograd, _lowrank_launch
from fasttrunc.kernels._backend import use_triton, use_triton_on
from fasttrunc.kernels.lowrank_plan import (
    DEFAULT_TUNABLES,
    LowrankPlan,
    LowrankTunables,
    dense_is_cheaper,
    plan_lowrank,
)
from fasttrunc.kernels.lowrank_reference import check_lowrank_inputs, lowrank_linear_reference
from fasttrunc.runs import compute_dtype

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# id(a) -> (weakref(a), weakref(b), a._version, b._version, W); entries leave with their `a`.
_DENSE: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], int, int, torch.Tensor]] = {}


def dense_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b @ a`` in the compute dtype, cast to ``a.dtype``; kept while ``a`` and ``b`` are unchanged."""
    entry = _DENSE.get(id(a))
    if entry is not None and entry[0]() is a and entry[1]() is b and entry[2] == a._version and entry[3] == b._version:
        return entry[4]
    compute = compute_dtype(a.dtype)
    with torch.no_grad():
        w = (b.to(compute) @ a.to(compute)).to(a.dtype)
    if entry is None or entry[0]() is not a:
        weakref.finalize(a, _DENSE.pop, id(a), None)
    _DENSE[id(a)] = (weakref.ref(a), weakref.ref(b), a._version, b._version, w)
    return w


def _dense_forward(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, wants_grad: bool
) -> torch.Tensor:
    if wants_grad or torch.compiler.is_compiling():
        compute = compute_dtype(a.dtype)
        w = (b.to(compute) @ a.to(compute)).to(a.dtype)  # in the graph: gradients reach a and b
    else:
        w = dense_weight(a, b)
    return F.linear(x, w, bias)


def lowrank_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tunables: LowrankTunables | None = None,
) -> torch.Tensor:
    """``y = (x @ a.T) @ b.T + bias`` for x of shape ``(..., in)``, a ``(r, in)``, b ``(out, r)``.

    Differentiable in x, a, b and bias. Rank 0 (``a`` of shape ``(0, in)``) gives the bias
    broadcast (zeros without one). Where the factors are no smaller than the dense weight
    (``r (in + out) >= in * out``) it computes ``F.linear(x, b @ a, bias)`` instead, on every
    backend. CUDA tensors (fp32 / fp16 / bf16) run the Triton kernels; CPU tensors run the torch
    reference unless Triton's interpreter is on; fp64 always runs the reference.
    ``FASTTRUNC_BACKEND=torch|triton`` overrides (see ``kernels/_backend.py``). ``tunables``
    (default :data:`~fasttrunc.kernels.lowrank_plan.DEFAULT_TUNABLES`) feeds the planner; the
    ``torch.compile`` path always plans with the defaults.
    """
    t = DEFAULT_TUNABLES if tunables is None else tunables
    sig = bound = None
    try:
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or a.requires_grad or b.requires_grad or (bias is not None and bias.requires_grad)
        )
        if not wants_grad and not torch.compiler.is_compiling():
            # Eager inference on a signature seen before: checks, plan and layout are bound already.
            sig = _lowrank_launch.signature(x, a, b, bias, t)
            bound = _lowrank_launch.BOUND.get(sig)
    except (AttributeError, TypeError):  # a non-tensor operand or unhashable tunables: named below
        sig = None
    if bound is not None and use_triton_on(bound.device_type):
        return _lowrank_launch.run_bound(bound, x, a, b, bias)
    check_lowrank_inputs(x, a, b, bias)  # raises for what the try above could not read
    if not isinstance(t, LowrankTunables):
        raise TypeError(f"tunables {t!r} is not a LowrankTunables")
    r, k = a.shape
    n = b.shape[0]
    if r and (t.force_scheme == "dense" or (t.force_scheme is None and dense_is_cheaper(k, n, r))):
        return _dense_forward(x, a, b, bias, wants_grad)
    if x.dtype not in _TRITON_DTYPES or not use_triton(x):
        return lowrank_linear_reference(x, a, b, bias)
    if torch.compiler.is_compiling():
        return _lowrank_autograd.lowrank_op(x, a, b, bias)  # opaque to the compiler, with a fake impl
    if wants_grad:
        out: torch.Tensor = _lowrank_autograd.LowRankLinearFunction.apply(x, a, b, bias, t)
        return out
    # Inference: no autograd node, the lightest eager path (launch cost is most of decode's time).
    return _lowrank_launch.lowrank_linear_triton(x, a, b, bias, t, sig)


__all__ = [
    "DEFAULT_TUNABLES",
    "LowrankPlan",
    "LowrankTunables",
    "check_lowrank_inputs",
    "dense_weight",
    "lowrank_linear",
    "lowrank_linear_reference",
    "plan_lowrank",
]
