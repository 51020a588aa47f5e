"""Low-rank linear ``y = (x @ a.T) @ b.T + bias`` in one Triton launch.

Layers of this file, top to bottom (DESIGN.md section 4):
1. Triton kernels    -- :func:`_lowrank_splitk_kernel` (decode, M <= ``DECODE_MAX_M``) and
                        :func:`_lowrank_tiled_kernel` (large M), sharing small ``@triton.jit`` helpers;
2. launcher          -- :func:`lowrank_linear_triton`: checks, allocates, picks the config from a
                        static table, launches (with a light launch path on CUDA);
3. torch reference   -- :func:`lowrank_linear_reference`, the test oracle and the CPU path;
4. autograd          -- :class:`_LowRankLinearFunction` (eager) and the custom op
                        ``fasttrunc::lowrank_linear`` with ``register_fake`` / ``register_autograd``
                        (what ``torch.compile`` sees); both use :func:`_lowrank_backward`;
5. public functional -- :func:`lowrank_linear`, which checks inputs and dispatches.

Which scheme serves which M, and why (numbers from BASELINES.md section 1, H200, bf16)
--------------------------------------------------------------------------------------
Decode, ``1 <= M <= DECODE_MAX_M`` (256): the op moves the weights once (``in*r + r*out``
elements) and almost nothing else, so the byte floor is 0.2-5 us while two cuBLAS launches cost
7-9 us of GPU time under graphs. The weights must be pulled by many SMs at once. A naive fused
kernel that recomputes ``x @ a.T`` in every column group re-reads ``a`` per group and loses badly
when ``in`` is large (BASELINES 1b: 29.4 us vs 8.5 us at 8192 -> 2048, r = 128, M = 1). So the
decode kernel splits the reduction over ``in`` instead, in ONE launch, with two roles:

* phase-1 programs each reduce one ``in`` chunk of ``x @ a.T`` for one M tile and write an fp32
  partial (``BLOCK_M x R``) to a small cached workspace, then bump a "done" counter;
* phase-2 programs wait until every partial is written, sum them in a fixed order
  (deterministic), cast once and stream their share of ``out`` tiles of ``b``; a program that owns
  a single ``out`` tile loads its ``b`` tile before it starts waiting, hiding that load behind
  phase 1.

The split count balances a program's share of ``a`` (A / n_split bytes) against what phase 2
re-reads (n_split fp32 partials): n_split ~ sqrt(A / P), within the program budget.

A program's role comes from an atomic *ticket* taken when it starts, not from its program id: a
phase-2 program (ticket >= number of phase-1 programs) only ever waits on programs that took
their tickets earlier, i.e. that are already running and never wait themselves. That makes the
grid-wide dependency deadlock-free without a grid sync or co-residency assumption (and lets
Triton's CPU interpreter, which runs programs one after another, execute the same code). The
last phase-2 program to finish resets the three counters to zero, so the workspace is ready for
the next call and for CUDA-graph replay: no host sync, no allocation after the first call for a
(device, size). One workspace per device means one split-K launch in flight per device.

Large M, ``M > DECODE_MAX_M``: there are enough rows to fill the GPU with M tiles, so each
program computes its ``BLOCK_M x R`` tile of ``h = x @ a.T`` in fp32 registers over the full
``in`` loop, casts it once and loops over ``out`` tiles: ``h`` never leaves the chip and ``x`` is
read once. When there are fewer M tiles than SMs and ``in <= out``, the ``out`` loop is split
over a few column groups that each recompute their ``h`` tile (re-reading ``x`` and ``a``, cheap
relative to the ``out`` work they share when ``in <= out``; never when ``in > out``, where 1b
shows recomputation losing).

The threshold and the table below are a design from the baseline numbers, not yet measured on a
GPU: ``benchmarks/bench_lowrank.py`` measures them (README, "Kernel: fused low-rank linear").

Precision
---------
Both products accumulate in fp32. The intermediate ``h`` is cast once before the second product:
* bf16: to bf16 (same exponent range as fp32, so no overflow; the tensor cores' native type);
* fp16: kept in fp32 and the second product runs as TF32 against ``b`` upcast to fp32: TF32 has
  fp32's exponent range and fp16's 10-bit mantissa, so ``h`` cannot overflow where casting it
  to fp16 would (|h| > 65504 while y fits), at about the accuracy of an fp16 cast; the op is
  memory-bound at these shapes, so TF32's half rate over fp16 costs little;
* fp32: both products with ``input_precision="ieee"`` (true fp32, like ``F.linear`` with torch's
  default ``allow_tf32=False``): fp32 is the dtype research runs use as the accurate reference,
  and speed targets are set in bf16.
fp64 always uses the torch reference.

Eager launch cost
-----------------
A Triton launch from Python costs ~12.8 us of host time (BASELINES 1b), as much as torch's two
GEMMs. Each call key (shapes, strides, dtype, device, bias or not) is planned once into a
:class:`_Launch`; later calls allocate the output and call the compiled kernel directly
(:class:`_FastLauncher`), skipping Triton's per-call argument binding and specialization.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from fasttrunc.kernels._backend import use_triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _operands_fit(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The common case of :func:`check_lowrank_inputs`, in few cheap comparisons (eager decode)."""
    if a.dim() != 2 or b.dim() != 2 or x.dim() < 1:
        return False
    dtype, device = x.dtype, x.device
    if dtype not in _FLOAT_DTYPES or a.dtype is not dtype or b.dtype is not dtype:
        return False
    if a.device != device or b.device != device or x.shape[-1] != a.shape[1] or b.shape[1] != a.shape[0]:
        return False
    return bias is None or (
        bias.dtype is dtype and bias.device == device and bias.dim() == 1 and bias.shape[0] == b.shape[0]
    )


def check_lowrank_inputs(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise a one-line ValueError when the operands of the low-rank linear do not fit together."""
    if _operands_fit(x, a, b, bias):
        return
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
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: float32, float16, bfloat16, float64")
    dtypes = {name: t.dtype for name, t in operands.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"x, a, b and bias must share one dtype; got {dtypes}")
    devices = {name: t.device for name, t in operands.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"x, a, b and bias must be on one device; got {devices}")


# ---------------------------------------------------------------------------------------------
# 1. Triton kernels (defined on first use, so that `import fasttrunc` never imports triton)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _kernels():
    # Compiled kernels resolve every name they use (``tl``, the helpers they call) through this
    # module's globals, so the imports and definitions below are bound there.
    global tl, _first_product, _load_b, _out_tile, _cast_h, _second_product
    global _lowrank_tiled_kernel, _lowrank_splitk_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _first_product(
        x_ptr,
        a_ptr,
        rows,
        M,
        k_lo,
        k_hi,
        stride_xm,
        stride_ar,
        R,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        R_PAD: tl.constexpr,
        PREC1: tl.constexpr,
    ):
        # h[BLOCK_M, R_PAD] = x[rows, k_lo:k_hi] @ a[:, k_lo:k_hi].T, accumulated in fp32.
        offs_r = tl.arange(0, R_PAD)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        r_ok = offs_r < R
        h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < k_hi
            xt = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            at = tl.load(
                a_ptr + offs_r[None, :] * stride_ar + ks[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0
            )
            h = tl.dot(xt, at, h, input_precision=PREC1)
        return h

    @triton.jit
    def _load_b(b_ptr, cols, N, R, stride_bn, R_PAD: tl.constexpr, H_FP32: tl.constexpr):
        # The (R_PAD, BLOCK_N) tile b[cols, :].T, upcast to fp32 when h stays fp32.
        offs_r = tl.arange(0, R_PAD)
        bt = tl.load(
            b_ptr + cols[None, :] * stride_bn + offs_r[:, None],
            mask=(offs_r < R)[:, None] & (cols < N)[None, :],
            other=0.0,
        )
        if H_FP32:
            bt = bt.to(tl.float32)
        return bt

    @triton.jit
    def _out_tile(hc, bt, bias_ptr, y_ptr, rows, cols, M, N, stride_ym, PREC2: tl.constexpr, HAS_BIAS: tl.constexpr):
        # y[rows, cols] = hc @ bt (+ bias[cols]), fp32 accumulation, one cast on store.
        acc = tl.dot(hc, bt, input_precision=PREC2)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(rows < M)[:, None] & (cols < N)[None, :],
        )

    @triton.jit
    def _cast_h(h, y_ptr, H_FP32: tl.constexpr):
        if H_FP32:
            hc = h
        else:
            hc = h.to(y_ptr.dtype.element_ty)  # the one cast of the intermediate
        return hc

    @triton.jit
    def _second_product(
        h,
        b_ptr,
        bias_ptr,
        y_ptr,
        rows,
        M,
        N,
        R,
        stride_bn,
        stride_ym,
        group,
        n_groups,
        BLOCK_N: tl.constexpr,
        R_PAD: tl.constexpr,
        H_FP32: tl.constexpr,
        PREC2: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        # y[rows, n] = h @ b[n, :].T (+ bias[n]) for the out tiles group, group + n_groups, ...
        hc = _cast_h(h, y_ptr, H_FP32)
        for n0 in range(group * BLOCK_N, N, n_groups * BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            bt = _load_b(b_ptr, cols, N, R, stride_bn, R_PAD, H_FP32)
            _out_tile(hc, bt, bias_ptr, y_ptr, rows, cols, M, N, stride_ym, PREC2, HAS_BIAS)

    @triton.jit
    def _lowrank_tiled_kernel(
        x_ptr,
        a_ptr,
        b_ptr,
        bias_ptr,
        y_ptr,
        M,
        K,
        N,
        R,
        stride_xm,
        stride_ar,
        stride_bn,
        stride_ym,
        N_GROUPS,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        R_PAD: tl.constexpr,
        H_FP32: tl.constexpr,
        PREC1: tl.constexpr,
        PREC2: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # Column groups of one M tile are adjacent program ids: they run together and share the
        # x tile through L2.
        m_tile = pid // N_GROUPS
        group = pid % N_GROUPS
        rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        h = _first_product(x_ptr, a_ptr, rows, M, 0, K, stride_xm, stride_ar, R, BLOCK_M, BLOCK_K, R_PAD, PREC1)
        _second_product(
            h,
            b_ptr,
            bias_ptr,
            y_ptr,
            rows,
            M,
            N,
            R,
            stride_bn,
            stride_ym,
            group,
            N_GROUPS,
            BLOCK_N,
            R_PAD,
            H_FP32,
            PREC2,
            HAS_BIAS,
        )

    @triton.jit
    def _lowrank_splitk_kernel(
        x_ptr,
        a_ptr,
        b_ptr,
        bias_ptr,
        y_ptr,
        ws_ptr,
        counters_ptr,
        M,
        K,
        N,
        R,
        stride_xm,
        stride_ar,
        stride_bn,
        stride_ym,
        N_SPLIT,
        K_CHUNK,
        N_GROUPS,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        R_PAD: tl.constexpr,
        H_FP32: tl.constexpr,
        PREC1: tl.constexpr,
        PREC2: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PREFETCH_B: tl.constexpr,
    ):
        # counters: [0] tickets taken, [1] phase-1 programs done, [2] phase-2 programs done.
        n_m = tl.cdiv(M, BLOCK_M)
        n_phase1 = n_m * N_SPLIT
        n_phase2 = n_m * N_GROUPS
        ticket = tl.atomic_add(counters_ptr, 1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, R_PAD)
        if ticket < n_phase1:
            m_tile = ticket // N_SPLIT
            split = ticket % N_SPLIT
            rows = m_tile * BLOCK_M + offs_m
            k_lo = split * K_CHUNK
            k_hi = tl.minimum(k_lo + K_CHUNK, K)
            h = _first_product(
                x_ptr, a_ptr, rows, M, k_lo, k_hi, stride_xm, stride_ar, R, BLOCK_M, BLOCK_K, R_PAD, PREC1
            )
            # workspace layout [n_m, N_SPLIT, BLOCK_M, R_PAD] fp32; rows past M are never read.
            slot = ws_ptr + (ticket * BLOCK_M + offs_m[:, None]) * R_PAD + offs_r[None, :]
            tl.store(slot, h, mask=(rows < M)[:, None])
            tl.debug_barrier()  # every thread's partial is written before the release below
            tl.atomic_add(counters_ptr + 1, 1, sem="release")
        else:
            job = ticket - n_phase1
            m_tile = job // N_GROUPS
            group = job % N_GROUPS
            rows = m_tile * BLOCK_M + offs_m
            row_ok = (rows < M)[:, None]
            if PREFETCH_B:
                # One out tile per program: fetch its b tile before waiting, hiding that load
                # behind phase 1.
                cols = group * BLOCK_N + tl.arange(0, BLOCK_N)
                bt = _load_b(b_ptr, cols, N, R, stride_bn, R_PAD, H_FP32)
            while tl.atomic_add(counters_ptr + 1, 0, sem="acquire") < n_phase1:
                pass
            h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            for split in range(0, N_SPLIT):
                slot = ws_ptr + ((m_tile * N_SPLIT + split) * BLOCK_M + offs_m[:, None]) * R_PAD + offs_r[None, :]
                # .cg: read through L2, never a stale L1 line of another SM's partial
                h += tl.load(slot, mask=row_ok, other=0.0, cache_modifier=".cg")
            if PREFETCH_B:
                _out_tile(_cast_h(h, y_ptr, H_FP32), bt, bias_ptr, y_ptr, rows, cols, M, N, stride_ym, PREC2, HAS_BIAS)
            else:
                _second_product(
                    h,
                    b_ptr,
                    bias_ptr,
                    y_ptr,
                    rows,
                    M,
                    N,
                    R,
                    stride_bn,
                    stride_ym,
                    group,
                    N_GROUPS,
                    BLOCK_N,
                    R_PAD,
                    H_FP32,
                    PREC2,
                    HAS_BIAS,
                )
            finished = tl.atomic_add(counters_ptr + 2, 1)
            if finished == n_phase2 - 1:
                # Last program out: every ticket is taken and every partial consumed; reset for
                # the next launch (and the next CUDA-graph replay).
                tl.atomic_xchg(counters_ptr, 0)
                tl.atomic_xchg(counters_ptr + 1, 0)
                tl.atomic_xchg(counters_ptr + 2, 0)

    return _lowrank_tiled_kernel, _lowrank_splitk_kernel


# ---------------------------------------------------------------------------------------------
# 2. Launcher: static config table, cached workspace, light launch path
# ---------------------------------------------------------------------------------------------

# M <= DECODE_MAX_M takes the split-K decode kernel. 256 is where BASELINES 1 stops being
# launch-bound (M = 256 costs barely more than M = 1 for both torch paths); to be confirmed by the
# benchmark, which times both schemes at every cell.
DECODE_MAX_M = 256
# None, "splitk" or "tiled": run every M with one kernel. Tests use it to reach both kernels with
# small shapes; the benchmark times both schemes at every cell to check DECODE_MAX_M.
FORCE_SCHEME: str | None = None
# Programs per phase, in units of the SM count: two CTAs per SM keep enough loads in flight to
# approach HBM bandwidth with the small tiles decode uses.
PROGRAMS_PER_SM = 2
# Each phase-1 program reduces at least this many `in` columns, so its fixed costs (ticket
# atomic, fp32 partial write) stay small next to the `a` bytes it reads.
MIN_K_CHUNK = 128
# Splits never exceed this: beyond it the partial reduction serializes phase 2.
MAX_SPLIT = 64
# SM count the interpreter plans for (there is no GPU to ask): small, so that CPU tests exercise
# multi-split, multi-group grids with few programs.
INTERPRETER_SMS = 4


@dataclass(frozen=True)
class _Config:
    """One launch plan: the scheme, block sizes, and the grid split."""

    scheme: str  # "splitk" or "tiled"
    block_m: int
    block_k: int
    block_n: int
    r_pad: int
    n_split: int
    k_chunk: int
    n_groups: int
    num_warps: int
    num_stages: int
    grid: int
    prefetch_b: bool  # split-K: each phase-2 program owns one out tile and loads it before waiting


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _plan(m: int, k: int, n: int, r: int, dtype: torch.dtype, sms: int) -> _Config:
    """The static config table, keyed by (M bucket, in, out, r, dtype) through its arguments."""
    if FORCE_SCHEME not in (None, "splitk", "tiled"):
        raise ValueError(f"FORCE_SCHEME {FORCE_SCHEME!r} is not a scheme; allowed: None, 'splitk', 'tiled'")
    # tl.dot needs every dimension >= 16 and tl.arange a power of two.
    r_pad = max(16, _next_pow2(r))
    itemsize = 4 if dtype == torch.float32 else 2
    # Rank-side tiles (R_PAD x BLOCK_K of a, BLOCK_N x R_PAD of b) stay <= 32 KB per pipeline
    # stage: 64 columns up to R_PAD = 256 (16-bit), halved per doubling of R_PAD or of the
    # element size, never below tl.dot's 16.
    block_k = block_n = max(16, min(64, (32 * 1024) // (r_pad * itemsize)))
    target = PROGRAMS_PER_SM * sms
    if FORCE_SCHEME == "splitk" or (FORCE_SCHEME is None and m <= DECODE_MAX_M):
        # Rows of the M tile: just enough for M (>= 16 for tl.dot), capped so the fp32 h tile
        # (BLOCK_M x R_PAD) stays <= 16K elements = 64 registers per thread at 8 warps.
        block_m = min(max(16, _next_pow2(m)), 64, max(16, 16384 // r_pad))
        n_m = -(-m // block_m)
        rows = min(m, block_m)
        n_groups = min(-(-n // block_n), max(1, target // n_m))
        # A program's critical path is about A / n_split (its share of a's bytes in phase 1) plus
        # n_split * P (phase 2 re-reads every split's fp32 partial, P = rows x R x 4 bytes):
        # minimal at n_split = sqrt(A / P).
        balance = round(math.sqrt((k * r * itemsize) / (rows * r_pad * 4)))
        n_split = max(1, min(balance, k // MIN_K_CHUNK, target // n_m, MAX_SPLIT))
        k_chunk = -(-(-(-k // n_split)) // block_k) * block_k  # ceil(k / n_split), rounded up to BLOCK_K
        n_split = max(1, -(-k // k_chunk))  # no empty splits
        grid = n_m * (n_split + n_groups)
        scheme = "splitk"
    else:
        # Larger M tiles re-read `a` (from L2) fewer times; cap the fp32 h tile at 16K elements.
        block_m = min(64, max(16, 16384 // r_pad))
        n_m = -(-m // block_m)
        n_tiles = -(-n // block_n)
        # Recompute h in a few column groups only when the GPU would otherwise idle and in <= out
        # (BASELINES 1b: recomputation loses when in > out).
        n_groups = max(1, min(n_tiles, sms // max(1, n_m))) if k <= n else 1
        n_split, k_chunk = 1, k
        grid = n_m * n_groups
        scheme = "tiled"
    # 8 warps once the fp32 accumulator passes 4K elements (keeps it <= 64 registers/thread).
    num_warps = 8 if block_m * r_pad > 4096 else 4
    # Up to three stages (loads in flight to cover HBM latency) while the pipelined operand
    # buffers stay <= 96 KB: that leaves room for the layout conversion of h (up to 64 KB)
    # within an A100's 164 KB of shared memory per SM (227 KB on H100 / H200).
    per_stage = (max(block_k, block_n) * r_pad + block_m * block_k) * itemsize
    num_stages = max(1, min(3, (96 * 1024) // per_stage))
    # Holding the b tile in registers across the wait pays only while it fits: ptxas (sm_90) shows
    # spills for fp32 (FMA dot operands) and at R_PAD = 1024, none for 16-bit up to R_PAD = 512.
    prefetch_b = scheme == "splitk" and n_groups * block_n >= n and itemsize == 2 and r_pad <= 512
    return _Config(
        scheme, block_m, block_k, block_n, r_pad, n_split, k_chunk, n_groups, num_warps, num_stages, grid, prefetch_b
    )


@functools.cache
def _cached_plan(m: int, k: int, n: int, r: int, dtype: torch.dtype, sms: int, tunables: tuple) -> _Config:
    return _plan(m, k, n, r, dtype, sms)


def plan_lowrank(m: int, k: int, n: int, r: int, dtype: torch.dtype, device: torch.device) -> _Config:
    """The launch plan for an (m x k) input, rank r, n outputs: cached per key, no autotuning."""
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else INTERPRETER_SMS
    )
    # The module-level tunables are part of the key, so tests (and tuning runs) can move them.
    return _cached_plan(m, k, n, r, dtype, sms, _tunables())


class _Workspace:
    """fp32 partials + three int32 counters for the split-K kernel, one set per device.

    Allocated (counters zeroed) on the first call for a device and grown only when a larger M
    needs more room; the kernel resets the counters itself, so later calls and CUDA-graph replays
    need no host work. Buffers that were outgrown are kept alive, because a CUDA graph captured
    earlier still points at them. One set per device means one split-K launch in flight per
    device: launches on two streams of one device must not overlap.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._buffers.get(device)
        if entry is not None and entry[0].numel() >= numel:
            return entry
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Zeroing the counters here would be recorded into the graph, not run now.
            raise RuntimeError(
                "lowrank_linear needs its workspace before CUDA-graph capture: call it once, outside "
                f"the capture, with the largest M the graph will use ({numel} fp32 partials needed)"
            )
        if entry is not None:
            self._retired.append(entry[0])
            counters = entry[1]
        else:
            counters = torch.zeros(3, dtype=torch.int32, device=device)
        # 64K floats (256 KB) at least, so that small M never triggers a regrowth.
        partials = torch.empty(max(numel, 1 << 16), dtype=torch.float32, device=device)
        self._buffers[device] = (partials, counters)
        return partials, counters


_WORKSPACE = _Workspace()


class _Launch:
    """A prepared launch for one call key: kernel, grid, integer arguments, constexprs, options.

    Built once per key (shapes, strides, dtype, device, bias or not), so an eager call only
    allocates the output and launches. ``compiled`` holds the binaries already launched for it,
    keyed by which tensor arguments are 16-byte aligned (the one thing Triton specializes on that
    the call key does not fix).
    """

    __slots__ = ("kernel", "grid", "ints", "constexprs", "options", "trailing", "ws_numel", "compiled")

    def __init__(self, kernel, grid: tuple, ints: tuple, constexprs: dict, options: dict, ws_numel: int) -> None:
        self.kernel, self.grid, self.ints = kernel, grid, ints
        self.constexprs, self.options, self.ws_numel = constexprs, options, ws_numel
        self.trailing = tuple(constexprs.values())  # the compiled launcher takes constexprs positionally
        self.compiled: dict[tuple, object] = {}


class _FastLauncher:
    """Launch a compiled kernel again without Triton's per-call argument binding.

    The first launch of a prepared launch goes through ``kernel[grid](...)`` (compiles if needed,
    returns the compiled kernel); later ones call the compiled kernel directly, with every
    argument in declaration order, constexprs included (Triton >= 3.3 passes them that way too).
    Any error on that path turns it off for good and falls back to the ordinary launch.
    """

    def __init__(self) -> None:
        self.enabled = True

    def __call__(self, launch: _Launch, tensors: tuple, device: torch.device) -> None:
        args = (*tensors, *launch.ints)
        if device.type != "cuda" or not self.enabled:
            launch.kernel[launch.grid](*args, **launch.constexprs, **launch.options)
            return
        aligned = tuple([t.data_ptr() % 16 == 0 for t in tensors])
        compiled = launch.compiled.get(aligned)
        if compiled is not None:
            try:
                compiled[launch.grid](*args, *launch.trailing)
                return
            except Exception:  # noqa: BLE001 - an unknown Triton launch API: use the ordinary path
                self.enabled = False
        compiled = launch.kernel[launch.grid](*args, **launch.constexprs, **launch.options)
        if self.enabled and compiled is not None and hasattr(compiled, "__getitem__"):
            launch.compiled[aligned] = compiled


_LAUNCH = _FastLauncher()
_PREPARED: dict[tuple, _Launch] = {}


def _precisions(dtype: torch.dtype) -> tuple[bool, str, str]:
    """(keep h in fp32, first-dot precision, second-dot precision); see the module docstring.

    Precision only matters for fp32 operands; 16-bit operands get Triton's CUDA default ("tf32"),
    which leaves them untouched.
    """
    if dtype == torch.float32:
        return True, "ieee", "ieee"
    if dtype == torch.float16:
        return True, "tf32", "tf32"  # second dot: fp32 h x fp32-upcast b on TF32 tensor cores
    return False, "tf32", "tf32"  # bf16: both dots bf16 x bf16 with fp32 accumulation


def _tunables() -> tuple:
    return (DECODE_MAX_M, FORCE_SCHEME, PROGRAMS_PER_SM, MIN_K_CHUNK, MAX_SPLIT, INTERPRETER_SMS)


def _prepare(key: tuple) -> _Launch:
    m, k, n, r, dtype, device, has_bias, sx, sa, sb, _ = key
    cfg = plan_lowrank(m, k, n, r, dtype, device)
    h_fp32, prec1, prec2 = _precisions(dtype)
    tiled, splitk = _kernels()
    constexprs = {
        "BLOCK_M": cfg.block_m,
        "BLOCK_K": cfg.block_k,
        "BLOCK_N": cfg.block_n,
        "R_PAD": cfg.r_pad,
        "H_FP32": h_fp32,
        "PREC1": prec1,
        "PREC2": prec2,
        "HAS_BIAS": has_bias,
    }
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    strides = (sx, sa, sb, n)  # y is a fresh contiguous (m, n)
    if cfg.scheme == "tiled":
        launch = _Launch(tiled, (cfg.grid,), (m, k, n, r, *strides, cfg.n_groups), constexprs, options, 0)
    else:
        ints = (m, k, n, r, *strides, cfg.n_split, cfg.k_chunk, cfg.n_groups)
        ws_numel = -(-m // cfg.block_m) * cfg.n_split * cfg.block_m * cfg.r_pad
        launch = _Launch(splitk, (cfg.grid,), ints, {**constexprs, "PREFETCH_B": cfg.prefetch_b}, options, ws_numel)
    _PREPARED[key] = launch
    return launch


def lowrank_linear_triton(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton forward: inputs checked by the caller; fp32 / fp16 / bf16 on CUDA or the interpreter."""
    dtype = x.dtype
    if dtype not in _TRITON_DTYPES:
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
    key = (m, k, n, r, dtype, device, bias is not None, sx, sa, sb, _tunables())
    launch = _PREPARED.get(key) or _prepare(key)
    y = torch.empty(m, n, dtype=dtype, device=device)
    tensors = (x2, a, b, y if bias is None else bias, y)  # the bias slot is never read without one
    if launch.ws_numel:
        tensors += _WORKSPACE.get(device, launch.ws_numel)
    _LAUNCH(launch, tensors, device)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------
# 3. Torch reference
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# 4. Autograd: torch in the backward (five GEMM-shaped products of which only the tiny M x r ones
#    could fuse; cuBLAS runs the large ones at its best, so a Triton backward does not pay here).
# ---------------------------------------------------------------------------------------------


def _lowrank_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    has_bias: bool,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``y = (x @ a.T) @ b.T + bias`` for x, a, b, bias, in fp32 like the reference."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
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


class _LowRankLinearFunction(torch.autograd.Function):
    """Eager autograd path: the Triton forward plus :func:`_lowrank_backward`."""

    @staticmethod
    def forward(ctx, x, a, b, bias):
        ctx.save_for_backward(x, a, b)
        ctx.has_bias = bias is not None
        return lowrank_linear_triton(x, a, b, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, a, b = ctx.saved_tensors
        return _lowrank_backward(grad_y, x, a, b, ctx.has_bias, tuple(ctx.needs_input_grad))


@torch.library.custom_op("fasttrunc::lowrank_linear", mutates_args=())
def _lowrank_op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return lowrank_linear_triton(x, a, b, bias)


@_lowrank_op.register_fake
def _(x, a, b, bias):
    return x.new_empty(*x.shape[:-1], b.shape[0])


def _op_setup_context(ctx, inputs, output):
    x, a, b, bias = inputs
    ctx.save_for_backward(x, a, b)
    ctx.has_bias = bias is not None


def _op_backward(ctx, grad_y):
    x, a, b = ctx.saved_tensors
    return _lowrank_backward(grad_y, x, a, b, ctx.has_bias, tuple(ctx.needs_input_grad))


_lowrank_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ---------------------------------------------------------------------------------------------
# 5. Public functional
# ---------------------------------------------------------------------------------------------


def lowrank_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = (x @ a.T) @ b.T + bias`` for x of shape ``(..., in)``, a ``(r, in)``, b ``(out, r)``.

    Differentiable in x, a, b and bias. Rank 0 (``a`` of shape ``(0, in)``) gives the bias
    broadcast (zeros without one). CUDA tensors (fp32 / fp16 / bf16) run the fused Triton
    kernel; CPU tensors run the torch reference unless Triton's interpreter is on; fp64 always
    runs the reference. ``FASTTRUNC_BACKEND=torch|triton`` overrides (see ``kernels/_backend.py``).
    """
    check_lowrank_inputs(x, a, b, bias)
    if x.dtype not in _TRITON_DTYPES or not use_triton(x):
        return lowrank_linear_reference(x, a, b, bias)
    if torch.compiler.is_compiling():
        return _lowrank_op(x, a, b, bias)  # opaque to the compiler, with a fake impl for tracing
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, a, b, bias)):
        return _LowRankLinearFunction.apply(x, a, b, bias)
    # Inference: no autograd node, the lightest eager path (launch cost is most of decode's time).
    return lowrank_linear_triton(x, a, b, bias)
