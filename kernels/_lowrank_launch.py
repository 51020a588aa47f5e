"""Launcher of the low-rank linear (layer 2): checks, plan, per-launch allocation, launch.

Every call key (shapes, strides, dtype, device, bias or not, tunables) is prepared once into a
:class:`PreparedLaunch`: the plan, and per kernel launch a :class:`KernelStep` with its grid (a
3-tuple, as Triton's compiled-kernel runner reads it), integer arguments and constexprs. A later
call with the same key allocates its output (and, for split-K, its own fp32 workspace from torch's
caching allocator, which is stream-ordered: two launches in flight never share one) and launches.

Eager launch cost: an ordinary ``kernel[grid](...)`` launch costs ~12.8 us of host time with
triton 3.6 (benchmarks/BASELINES.md 1b). :class:`KernelStep` launches through Triton once, keeps
the compiled kernel's runner ``compiled[grid]`` (bound to the grid once) per pointer-alignment
pattern, the one thing Triton specializes on that the call key does not fix, and calls it directly
afterwards with every argument in declaration order (constexprs included, as Triton's own launch
passes them in 3.6 and 3.9). An error on that path turns it off for the step, and the ordinary
launch takes over.

Every launch runs under ``torch.cuda.device(x.device)``: the kernel goes to the tensors' device,
not the current one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fasttrunc.kernels.lowrank_plan import DEFAULT_TUNABLES, LowrankPlan, LowrankTunables, device_sms, plan_lowrank

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def precisions(dtype: torch.dtype) -> tuple[bool, str, str]:
    """(keep h in fp32, first-dot precision, second-dot precision).

    Precision only matters for fp32 operands; 16-bit operands get Triton's CUDA default ("tf32"),
    which leaves them untouched. fp32 runs true fp32 products ("ieee"), like ``F.linear`` with
    torch's default ``allow_tf32=False``; fp16 keeps ``h`` in fp32 and runs the second product on
    TF32 tensor cores against ``b`` upcast to fp32 (fp32's exponent range: an ``h`` above 65504
    cannot overflow), bf16 casts ``h`` once to bf16.
    """
    if dtype == torch.float32:
        return True, "ieee", "ieee"
    if dtype == torch.float16:
        return True, "tf32", "tf32"
    return False, "tf32", "tf32"


class KernelStep:
    """One kernel launch of a prepared call: kernel, 3-D grid, integer arguments, constexprs, options."""

    __slots__ = ("kernel", "grid", "ints", "constexprs", "options", "trailing", "runners", "fast")

    def __init__(
        self,
        kernel: Any,
        grid: tuple[int, int, int],
        ints: tuple[int, ...],
        constexprs: dict[str, Any],
        options: dict[str, int],
    ) -> None:
        if len(grid) != 3:
            raise ValueError(f"grid {grid!r} must have three dimensions (Triton's runner reads grid[0..2])")
        self.kernel, self.grid, self.ints = kernel, grid, ints
        self.constexprs, self.options = constexprs, options
        self.trailing = tuple(constexprs.values())  # the compiled runner takes constexprs positionally
        self.runners: dict[tuple[bool, ...], Callable[..., Any]] = {}
        self.fast = True  # the light path, until it fails once

    def __call__(self, tensors: Sequence[torch.Tensor], aligned: tuple[bool, ...] | None) -> None:
        """Launch on ``tensors``; ``aligned`` (which operands are 16-byte aligned) is None off CUDA."""
        args = (*tensors, *self.ints)
        if aligned is None:
            self.kernel[self.grid](*args, **self.constexprs, **self.options)
            return
        runner = self.runners.get(aligned) if self.fast else None
        if runner is not None:
            try:
                runner(*args, *self.trailing)
                return
            except Exception:  # noqa: BLE001 - an unknown Triton launch API: back to the ordinary path
                self.fast = False
                self.runners.clear()
        compiled = self.kernel[self.grid](*args, **self.constexprs, **self.options)
        if self.fast and compiled is not None and hasattr(compiled, "__getitem__"):
            self.runners[aligned] = compiled[self.grid]


class PreparedLaunch:
    """The plan of one call key and its kernel steps (none for the torch schemes)."""

    __slots__ = ("plan", "steps")

    def __init__(self, plan: LowrankPlan, steps: tuple[KernelStep, ...]) -> None:
        self.plan, self.steps = plan, steps


def _device_guard_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.device(device)`` for a CUDA device, a no-op elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


# What a launch asks about its device, and the guard every CUDA launch runs under: module names,
# so that tests and the host-overhead measurement can stand in a CUDA device on a CPU.
is_cuda = _is_cuda
device_guard = _device_guard_for


def _sms(device: torch.device, tunables: LowrankTunables) -> int:
    return device_sms(device) if device.type == "cuda" else tunables.interpreter_sms


def build_steps(plan: LowrankPlan, dtype: torch.dtype, has_bias: bool, ints: dict[str, int]) -> tuple[KernelStep, ...]:
    """The kernel launches of a Triton plan (imports the kernels: the first launch's cost)."""
    from fasttrunc.kernels import _lowrank_triton as kt

    h_fp32, prec1, prec2 = precisions(dtype)
    options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    m, k, n, r = ints["m"], ints["k"], ints["n"], ints["r"]
    sx, sa, sb = ints["sx"], ints["sa"], ints["sb"]
    second: dict[str, Any] = {"H_FP32": h_fp32, "PREC2": prec2, "HAS_BIAS": has_bias}
    if plan.scheme == "tiled":
        const: dict[str, Any] = {
            "BLOCK_M": plan.block_m,
            "BLOCK_K": plan.block_k,
            "BLOCK_N": plan.block_n,
            "R_PAD": plan.r_pad,
        }
        const |= {"H_FP32": h_fp32, "PREC1": prec1, "PREC2": prec2, "HAS_BIAS": has_bias}
        tiled = (m, k, n, r, sx, sa, sb, n, plan.n_groups)  # y is a fresh contiguous (m, n)
        return (KernelStep(kt.lowrank_tiled_kernel, plan.grids[0], tiled, const, options),)
    shrink_const: dict[str, Any] = {
        "BLOCK_M": plan.block_m,
        "BLOCK_K": plan.block_k,
        "R_PAD": plan.r_pad,
        "PREC1": prec1,
    }
    expand_const: dict[str, Any] = {"BLOCK_M": plan.block_m, "BLOCK_N": plan.block_n, "R_PAD": plan.r_pad}
    expand_const |= {"SPLIT_BLOCK": plan.split_block, **second}
    return (
        KernelStep(
            kt.lowrank_shrink_kernel,
            plan.grids[0],
            (m, k, r, sx, sa, plan.n_split, plan.k_chunk),
            shrink_const,
            options,
        ),
        KernelStep(
            kt.lowrank_expand_kernel,
            plan.grids[1],
            (m, n, r, sb, n, plan.n_split, plan.n_groups),
            expand_const,
            options,
        ),
    )


_PREPARED: dict[tuple[Any, ...], PreparedLaunch] = {}


def prepare(key: tuple[Any, ...]) -> PreparedLaunch:
    m, k, n, r, dtype, device, has_bias, sx, sa, sb, tunables = key
    plan = plan_lowrank(m, k, n, r, dtype, _sms(device, tunables), tunables)
    steps: tuple[KernelStep, ...] = ()
    if plan.triton:
        steps = build_steps(plan, dtype, has_bias, {"m": m, "k": k, "n": n, "r": r, "sx": sx, "sa": sa, "sb": sb})
    prepared = PreparedLaunch(plan, steps)
    _PREPARED[key] = prepared  # one dict store: concurrent preparers of a key build equal entries
    return prepared


def _two_gemms(x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The ``"torch"`` scheme (and ``"dense"`` when the launcher is called directly): cuBLAS's two GEMMs.

    bf16 keeps torch's bf16 intermediate (fp32's exponent range, the fused kernel's cast too);
    fp16 and fp32 compute in fp32, so an fp16 intermediate cannot overflow.
    """
    if x2.dtype == torch.bfloat16:
        y = (x2 @ a.T) @ b.T
        return y if bias is None else y + bias
    from fasttrunc.kernels.lowrank_reference import lowrank_linear_reference

    return lowrank_linear_reference(x2, a, b, bias)


def lowrank_linear_triton(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    tunables: LowrankTunables = DEFAULT_TUNABLES,
) -> torch.Tensor:
    """The Triton forward: inputs checked by the caller; fp32 / fp16 / bf16 on CUDA or the interpreter."""
    dtype = x.dtype
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton kernel takes float32, float16 or bfloat16; got {dtype}")
    r, k = a.shape
    n = b.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # a view whenever the leading dims can be flattened
    m = x2.shape[0]
    if r == 0 or k == 0 or m == 0 or n == 0:
        # No product to compute: the bias broadcast (a fresh tensor), or zeros, or an empty result.
        shape = (*x.shape[:-1], n)
        return x.new_zeros(shape) if bias is None else bias.expand(shape).clone()
    # The kernels index the feature dims with unit stride (vectorized loads); a copy happens only
    # for an x / a / b whose last dim is itself strided.
    sx, sx1 = x2.stride()
    if sx1 != 1:
        x2, sx = x2.contiguous(), k
    sa, sa1 = a.stride()
    if sa1 != 1:
        a, sa = a.contiguous(), k
    sb, sb1 = b.stride()
    if sb1 != 1:
        b, sb = b.contiguous(), r
    device = x.device
    key = (m, k, n, r, dtype, device, bias is not None, sx, sa, sb, tunables)
    prepared = _PREPARED.get(key) or prepare(key)
    steps = prepared.steps
    if not steps:
        y = _two_gemms(x2, a, b, bias)
    elif is_cuda(device):
        with device_guard(device):
            y = _launch(prepared, x2, a, b, bias, m, n, device, True)
    else:
        y = _launch(prepared, x2, a, b, bias, m, n, device, False)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def _launch(
    prepared: PreparedLaunch,
    x2: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    m: int,
    n: int,
    device: torch.device,
    on_cuda: bool,
) -> torch.Tensor:
    steps = prepared.steps
    y = torch.empty(m, n, dtype=x2.dtype, device=device)
    bias_arg = y if bias is None else bias  # the bias slot is never read without one
    # The binaries differ by which pointers are 16-byte aligned; fresh allocations (y, the
    # workspace) always are, so only the caller's operands are looked at.
    aligned: tuple[bool, ...] | None = None
    if on_cuda:
        aligned = (
            x2.data_ptr() % 16 == 0,
            a.data_ptr() % 16 == 0,
            b.data_ptr() % 16 == 0,
            bias_arg.data_ptr() % 16 == 0,
        )
    if len(steps) == 1:
        steps[0]((x2, a, b, bias_arg, y), aligned)
    else:
        # Split-K: this launch's own partials, from the stream-ordered caching allocator.
        ws = torch.empty(prepared.plan.ws_numel, dtype=torch.float32, device=device)
        steps[0]((x2, a, ws), aligned)
        steps[1]((ws, b, bias_arg, y), aligned)
    return y
