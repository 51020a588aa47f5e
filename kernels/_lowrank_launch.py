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

Every launch goes to the tensors' device, not the current one: under a :class:`CudaDeviceGuard`,
which a bound launch skips when only one CUDA device is visible (it is then always current).

Bound launches (:class:`BoundLaunch`, :func:`run_bound`): an eager inference call whose
:func:`signature` was seen before skips the functional's checks, the prepared-launch key, the
stride and reshape work, and calls the steps' runners directly when every operand is 16-byte
aligned; a signature the planner gives to torch's two GEMMs calls them directly. Signatures that
needed a copy of an operand are never bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fasttrunc.kernels.lowrank_plan import (
    DEFAULT_TUNABLES,
    LowrankPlan,
    LowrankTunables,
    ctas_per_sm,
    device_limits,
    device_sms,
    device_supports_pdl,
    plan_lowrank,
)

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

    __slots__ = ("kernel", "grid", "ints", "constexprs", "options", "tail", "runners", "fast", "compiled")

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
        # The compiled runner takes the integers, then the constexprs, positionally after the tensors.
        self.tail = (*ints, *constexprs.values())
        self.runners: dict[tuple[bool, ...], Callable[..., Any]] = {}
        self.fast = True  # the light path, until it fails once
        self.compiled: Any = None  # the compiled kernel of the first CUDA launch (its registers, shared memory)

    def __call__(self, tensors: Sequence[torch.Tensor], aligned: tuple[bool, ...] | None) -> None:
        """Launch on ``tensors``; ``aligned`` (which operands are 16-byte aligned) is None off CUDA."""
        if aligned is not None and self.fast:
            runner = self.runners.get(aligned)
            if runner is not None:
                try:
                    runner(*tensors, *self.tail)
                    return
                except Exception:  # noqa: BLE001 - an unknown Triton launch API: back to the ordinary path
                    self.leave_light_path()
        compiled = self.kernel[self.grid](*tensors, *self.ints, **self.constexprs, **self.options)
        if aligned is None:
            return
        if self.compiled is None:
            self.compiled = compiled
        if self.fast and compiled is not None and hasattr(compiled, "__getitem__"):
            self.runners[aligned] = compiled[self.grid]

    def leave_light_path(self) -> None:
        """After a failed runner call: every later launch of this step goes through Triton's own launch."""
        self.fast = False
        self.runners.clear()


class PreparedLaunch:
    """The plan of one call key and its kernel steps (none for the torch schemes).

    ``sized``: the grids are final. A CUDA plan is first made with the assumed programs per SM;
    after its first launch :func:`size_from_occupancy` re-plans it from the compiled kernels'
    real occupancy (off CUDA, and for the torch schemes, it is final from the start).
    """

    __slots__ = ("plan", "steps", "sized")

    def __init__(self, plan: LowrankPlan, steps: tuple[KernelStep, ...], sized: bool = True) -> None:
        self.plan, self.steps, self.sized = plan, steps, sized


class CudaDeviceGuard:
    """Makes ``index`` the current CUDA device for a ``with`` block and restores the previous one.

    What ``torch.cuda.device`` does, without its per-call index parsing: the two calls it makes
    into torch's C side (exchange on entry, restore on exit only if it changed). One object per
    launch, so threads never share the saved index.
    """

    __slots__ = ("index", "previous")

    def __init__(self, index: int) -> None:
        self.index, self.previous = index, -1

    def __enter__(self) -> None:
        self.previous = torch.cuda._exchange_device(self.index)

    def __exit__(self, *exc: object) -> None:
        torch.cuda._maybe_exchange_device(self.previous)


def _device_guard_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A :class:`CudaDeviceGuard` for a CUDA device (its index, or the current one), a no-op elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return CudaDeviceGuard(device.index if device.index is not None else torch.cuda.current_device())


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


# What a launch asks about its device, the guard a CUDA launch runs under and how many devices
# there are: module names, so that tests and the host-overhead measurement can stand in a CUDA
# device (or several) on a CPU.
is_cuda = _is_cuda
device_guard = _device_guard_for
cuda_device_count = torch.cuda.device_count
sm_limits = device_limits
supports_pdl = device_supports_pdl


def _sms(device: torch.device, tunables: LowrankTunables) -> int:
    return device_sms(device) if device.type == "cuda" else tunables.interpreter_sms


def plan_for(
    m: int,
    k: int,
    n: int,
    r: int,
    dtype: torch.dtype,
    device: torch.device,
    tunables: LowrankTunables,
    occupancy: tuple[int, ...] | None = None,
) -> LowrankPlan:
    """The plan a call on ``device`` takes: the device's SM count; off CUDA (the interpreter) the
    rules instead of the cost model, which estimates GPU time and would route the small test
    shapes to torch, away from the kernels the interpreter exists to run."""
    planning = tunables if device.type == "cuda" else tunables.rules_only()
    return plan_lowrank(m, k, n, r, dtype, _sms(device, tunables), planning, occupancy)


def build_steps(
    plan: LowrankPlan, dtype: torch.dtype, has_bias: bool, ints: dict[str, int], pdl: bool = False
) -> tuple[KernelStep, ...]:
    """The kernel launches of a Triton plan (imports the kernels: the first launch's cost).

    ``pdl``: the split-K expand grid launched with programmatic dependent launch (sm_90+ only).
    """
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
        "WS_ROWS": plan.ws_rows,
        "GDC": pdl,
    }
    expand_const: dict[str, Any] = {"BLOCK_M": plan.block_m, "BLOCK_N": plan.block_n, "R_PAD": plan.r_pad}
    expand_const |= {"SPLIT_BLOCK": plan.split_block, "WS_ROWS": plan.ws_rows, **second, "GDC": pdl}
    expand_options = options | {"launch_pdl": True} if pdl else options
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
            expand_options,
        ),
    )


_PREPARED: dict[tuple[Any, ...], PreparedLaunch] = {}


def signature(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, tunables: LowrankTunables
) -> tuple[Any, ...]:
    """What every decision of an eager call depends on, read in a few attribute lookups.

    Shapes, strides, dtypes and devices of every operand, and the tunables (frozen, their hash
    computed once). Two calls with equal signatures pass the same checks, take the same plan and
    launch the same binaries (up to pointer alignment, read per call). Raises AttributeError for
    a non-tensor operand.
    """
    return (
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        a.shape,
        a.stride(),
        a.dtype,
        a.device,
        b.shape,
        b.stride(),
        b.dtype,
        b.device,
        None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device),
        tunables,
    )


class BoundLaunch:
    """An eager call signature with every decision made: checks passed, plan and steps chosen,
    no operand needing a copy or a reshape. A later call with the same :func:`signature` only
    allocates its output (and split-K workspace) and launches (:func:`run_bound`); with no steps
    (the ``"torch"`` scheme) it runs the two GEMMs."""

    __slots__ = (
        "tunables",
        "steps",
        "out_shape",
        "device",
        "device_type",
        "on_cuda",
        "guarded",
        "ws_numel",
        "ws_like",
        "direct",
    )

    def __init__(self, tunables: LowrankTunables, prepared: PreparedLaunch, x: torch.Tensor, n: int) -> None:
        self.tunables = tunables
        self.steps = prepared.steps
        self.out_shape = (*x.shape[:-1], n)
        self.device, self.device_type = x.device, x.device.type
        self.on_cuda = is_cuda(x.device)
        # With one visible CUDA device it is always the current one: no guard to pay for. Several:
        # every launch runs under the guard (the count is fixed for the process once CUDA is up).
        self.guarded = self.on_cuda and cuda_device_count() != 1
        self.ws_numel = prepared.plan.ws_numel
        # An empty fp32 tensor on the device: ``ws_like.new_empty(n)`` is the cheapest allocation
        # of a split-K workspace (about 0.9 us against 1.2 us for torch.empty with keywords here).
        self.ws_like = torch.empty(0, dtype=torch.float32, device=x.device)
        # The steps' compiled runners for all-aligned operands, once known (see run_bound).
        self.direct: tuple[Callable[..., Any], ...] | None = None


# signature -> BoundLaunch. Bounded: a workload with ever new shapes (prefill lengths) starts over
# rather than growing without end; a plain dict store, so concurrent binders write equal entries.
BOUND: dict[tuple[Any, ...], BoundLaunch] = {}
BOUND_MAX = 4096


def run_bound(
    bound: BoundLaunch, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Allocate and launch a bound call; ``x`` is passed whole (its rows are evenly strided)."""
    if not bound.steps:
        return two_gemms(x, a, b, bias)  # the "torch" scheme: cuBLAS's GEMMs allocate for themselves
    device = bound.device
    # x.new_empty with unpacked sizes: x has the bound's dtype and device (the signature says so),
    # and this form is the cheapest allocation call (about 0.8 us against 1.5 us for
    # torch.empty(shape_tuple, dtype=..., device=...) on this CPU).
    y = x.new_empty(*bound.out_shape)
    bias_arg = y if bias is None else bias
    steps = bound.steps
    if not bound.on_cuda:
        aligned = None
    elif (x.data_ptr() | a.data_ptr() | b.data_ptr() | (0 if bias is None else bias.data_ptr())) & 15 == 0:
        # (y, the bias slot without a bias, is a fresh allocation: always aligned.)
        aligned = ALL_ALIGNED
        direct = bound.direct
        if direct is None:
            direct = bound.direct = _direct_runners(steps)
        if direct:
            # Every pointer 16-byte aligned and each step's compiled runner known: call them as they are.
            try:
                if bound.guarded:
                    with device_guard(device):
                        _call_direct(direct, steps, bound, x, a, b, bias_arg, y)
                else:  # one visible device, always the current one: no guard (not even a null one) to enter
                    _call_direct(direct, steps, bound, x, a, b, bias_arg, y)
                return y
            except Exception:  # noqa: BLE001 - an unknown Triton launch API: the steps' ordinary launches
                for step in steps:
                    step.leave_light_path()
                bound.direct = ()
    else:
        aligned = _alignment(x, a, b, bias_arg)
    with device_guard(device) if bound.guarded else _NO_GUARD:
        _launch_steps(steps, x, a, b, bias_arg, y, bound.ws_numel, device, aligned)
    return y


def _call_direct(
    direct: tuple[Callable[..., Any], ...],
    steps: tuple[KernelStep, ...],
    bound: BoundLaunch,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias_arg: torch.Tensor,
    y: torch.Tensor,
) -> None:
    if len(direct) == 1:
        direct[0](x, a, b, bias_arg, y, *steps[0].tail)
    else:
        ws = bound.ws_like.new_empty(bound.ws_numel)
        direct[0](x, a, ws, *steps[0].tail)
        direct[1](ws, b, bias_arg, y, *steps[1].tail)


def _alignment(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias_arg: torch.Tensor) -> tuple[bool, ...]:
    """Which of the caller's operands are 16-byte aligned: what the binaries differ by (fresh
    allocations, the output and the workspace, always are)."""
    return (x.data_ptr() % 16 == 0, a.data_ptr() % 16 == 0, b.data_ptr() % 16 == 0, bias_arg.data_ptr() % 16 == 0)


def _launch_steps(
    steps: tuple[KernelStep, ...],
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias_arg: torch.Tensor,
    y: torch.Tensor,
    ws_numel: int,
    device: torch.device,
    aligned: tuple[bool, ...] | None,
) -> None:
    """The plan's launches into ``y``: one tiled launch, or split-K's shrink then expand."""
    if len(steps) == 1:
        steps[0]((x, a, b, bias_arg, y), aligned)
    else:
        # Split-K: this launch's own partials, from the stream-ordered caching allocator.
        ws = torch.empty(ws_numel, dtype=torch.float32, device=device)
        steps[0]((x, a, ws), aligned)
        steps[1]((ws, b, bias_arg, y), aligned)


ALL_ALIGNED: tuple[bool, ...] = (True, True, True, True)


def _direct_runners(steps: tuple[KernelStep, ...]) -> tuple[Callable[..., Any], ...] | None:
    """Each step's runner for all-aligned operands, or None while one is not known yet (or () once
    the light path is off: the steps launch the ordinary way from then on)."""
    if not all(step.fast for step in steps):
        return ()
    runners = tuple(step.runners.get(ALL_ALIGNED) for step in steps)
    return runners if all(r is not None for r in runners) else None  # type: ignore[return-value]


_NO_GUARD = contextlib.nullcontext()


def prepare(key: tuple[Any, ...], occupancy: tuple[int, ...] | None = None) -> PreparedLaunch:
    m, k, n, r, dtype, device, has_bias, sx, sa, sb, tunables = key
    plan = plan_for(m, k, n, r, dtype, device, tunables, occupancy)
    steps: tuple[KernelStep, ...] = ()
    if plan.triton:
        ints = {"m": m, "k": k, "n": n, "r": r, "sx": sx, "sa": sa, "sb": sb}
        pdl = tunables.pdl and device.type == "cuda" and supports_pdl(device)
        steps = build_steps(plan, dtype, has_bias, ints, pdl)
    prepared = PreparedLaunch(plan, steps, sized=occupancy is not None or not steps or not is_cuda(device))
    _PREPARED[key] = prepared  # one dict store: concurrent preparers of a key build equal entries
    return prepared


def size_from_occupancy(key: tuple[Any, ...], prepared: PreparedLaunch) -> PreparedLaunch:
    """After a plan's first CUDA launch: its grids re-planned from each compiled kernel's CTAs per SM.

    Block sizes, warps and stages stay, so the binaries do too; only the split count and the
    column groups can change (e.g. R_PAD = 512 configs fit 1 CTA per SM, not the 2 assumed).
    Where the compiled kernels cannot be read (another launch API), the plan stays as it is.
    """
    compiled = [step.compiled for step in prepared.steps]
    regs = [getattr(c, "n_regs", None) for c in compiled]
    shared = [getattr(getattr(c, "metadata", None), "shared", None) for c in compiled]
    if not all(isinstance(v, int) for v in (*regs, *shared)):
        prepared.sized = True
        return prepared
    limits = sm_limits(key[5])
    occupancy = tuple(
        ctas_per_sm(int(n_regs), int(smem), step.options["num_warps"], limits)  # type: ignore[arg-type]
        for n_regs, smem, step in zip(regs, shared, prepared.steps)
    )
    m, k, n, r, dtype, device, *_, tunables = key
    if plan_for(m, k, n, r, dtype, device, tunables, occupancy) == prepared.plan:
        prepared.sized = True
        return prepared
    return prepare(key, occupancy)


def _two_gemms(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The ``"torch"`` scheme (and ``"dense"`` when the launcher is called directly): cuBLAS's two GEMMs.

    ``x`` of shape ``(..., in)``. bf16 keeps torch's bf16 intermediate (fp32's exponent range, the
    fused kernel's cast too): ``F.linear`` without a bias is ``x @ a.T`` without building the
    transposed view. fp16 and fp32 compute in fp32, so an fp16 intermediate cannot overflow.
    """
    if x.dtype == torch.bfloat16:
        y = _linear(_linear(x, a), b)
        return y if bias is None else y + bias
    from fasttrunc.kernels.lowrank_reference import lowrank_linear_reference

    return lowrank_linear_reference(x, a, b, bias)


_linear = torch.nn.functional.linear
# The torch scheme's call: a module name, so that the host-overhead measurement can stub the GEMMs.
two_gemms = _two_gemms


def lowrank_linear_triton(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    tunables: LowrankTunables = DEFAULT_TUNABLES,
    sig: tuple[Any, ...] | None = None,
) -> torch.Tensor:
    """The Triton forward: inputs checked by the caller; fp32 / fp16 / bf16 on CUDA or the interpreter.

    ``sig``: the call's :func:`signature` when the caller has it already.
    """
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
    # for an x / a / b whose last dim is itself strided (or a strided bias). Bindable (a later call
    # of this signature may skip everything up to the launch): x's rows evenly strided (flattening
    # was a view) and no operand needing those copies.
    sx, sx1 = x2.stride()
    sa, sa1 = a.stride()
    sb, sb1 = b.stride()
    bindable = x2.data_ptr() == x.data_ptr() and sx1 == sa1 == sb1 == 1 and (bias is None or bias.stride(0) == 1)
    if not bindable:
        sig = None
    elif sig is None:
        sig = signature(x, a, b, bias, tunables)
    if sx1 != 1:
        x2, sx = x2.contiguous(), k
    if sa1 != 1:
        a, sa = a.contiguous(), k
    if sb1 != 1:
        b, sb = b.contiguous(), r
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernels read the bias with unit stride
    device = x.device
    key = (m, k, n, r, dtype, device, bias is not None, sx, sa, sb, tunables)
    prepared = _PREPARED.get(key) or prepare(key)
    steps = prepared.steps
    if not steps:
        y = two_gemms(x2, a, b, bias)
    elif is_cuda(device):
        with device_guard(device):
            y = _launch(prepared, x2, a, b, bias, m, n, device, True)
    else:
        y = _launch(prepared, x2, a, b, bias, m, n, device, False)
    if not prepared.sized:
        prepared = size_from_occupancy(key, prepared)
    # Triton plans bind once sized; the torch scheme binds at once (a repeated call then skips
    # the checks and the plan lookup on its way to cuBLAS, as the kernels' calls do).
    if (prepared.steps or prepared.plan.scheme == "torch") and prepared.sized and sig is not None and sig not in BOUND:
        if len(BOUND) >= BOUND_MAX:
            BOUND.clear()
        BOUND[sig] = BoundLaunch(tunables, prepared, x, n)
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
    y = torch.empty(m, n, dtype=x2.dtype, device=device)
    bias_arg = y if bias is None else bias  # the bias slot is never read without one
    aligned = _alignment(x2, a, b, bias_arg) if on_cuda else None
    _launch_steps(prepared.steps, x2, a, b, bias_arg, y, prepared.plan.ws_numel, device, aligned)
    return y
