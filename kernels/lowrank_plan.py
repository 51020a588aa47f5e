"""Launch planner of the low-rank linear: a pure function of shapes, dtype, device properties and tunables.

:func:`plan_lowrank` picks one of four schemes for ``y = (x @ a.T) @ b.T`` (M rows, ``in = k``,
``out = n``, rank ``r``) and, for the two Triton schemes, every block size, split and grid. It
reads no globals and probes no hardware: the caller passes the SM count (:func:`device_sms` reads
it once per CUDA device) and a frozen :class:`LowrankTunables` (tests and ``fasttrunc bench`` pass
their own).

Cost model (bytes moved and FLOPs per call; ``s`` = element size)
-----------------------------------------------------------------
- factored, fused or two GEMMs: ``s (M k + r (k + n) + M n)`` bytes, ``2 M r (k + n)`` FLOPs;
- dense with the rank-r weight ``W = b @ a`` held: ``s (M k + k n + M n)`` bytes, ``2 M k n`` FLOPs.
When ``r (k + n) >= k n`` the factors hold at least as many elements as ``W``: the dense product
moves fewer bytes *and* does fewer FLOPs at every M, so the planner answers ``"dense"`` (the
functional keeps ``W`` for inference, see :mod:`fasttrunc.kernels.lowrank`). Below that, factors
win on both counts and the choice is between the fused kernel and torch's two GEMMs:
- ``r > max_fused_rank``: the fused kernels keep a ``BLOCK_M x R_PAD`` fp32 tile of ``x @ a.T`` in
  registers; past R_PAD = 1024 the tiles shrink to 16 x 16 with one pipeline stage (the sweep
  benchmark reached rank 1843) and cuBLAS's two GEMMs, which tile r freely, are the better
  kernel: ``"torch"``;
- with a cost model (``tunables.cost_model``, the default on CUDA): the scheme with the lowest
  estimate of :func:`scheme_estimates` (:mod:`fasttrunc.kernels.lowrank_cost`: ``"splitk"``,
  ``"tiled"`` or ``"torch"``), a Triton scheme only when its estimate times the model's margin
  is below the two GEMMs';
- by the rules (``cost_model=None``, and always in the interpreter): ``M <= decode_max_m`` takes
  ``"splitk"`` (two launches, see :mod:`fasttrunc.kernels._lowrank_triton`); otherwise ``"tiled"``,
  up to R_PAD = ``max_tiled_rank`` (256); beyond it ``"torch"``: those tiles reach no wgmma
  (benchmarks/AOT_AUDIT.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from fasttrunc import checks
from fasttrunc.kernels.lowrank_cost import DEFAULT_COST_MODEL, LowrankCostModel, fused_us, two_gemms_us

SCHEMES = ("dense", "torch", "splitk", "tiled")


@dataclasses.dataclass(frozen=True)
class LowrankTunables:
    """The planner's tuned constants; every one carries its reason (numbers from benchmarks/BASELINES.md)."""

    # M <= decode_max_m takes split-K. 256 is where benchmarks/BASELINES.md section 1 stops being launch-bound
    # (M = 256 costs barely more than M = 1 for both torch paths); the benchmark checks it by timing
    # both schemes at every cell.
    decode_max_m: int = 256
    # None or one of SCHEMES: every call takes that scheme ("dense" / "torch" only where legal).
    # Tests reach both kernels with small shapes; the benchmark times each scheme per cell.
    force_scheme: str | None = None
    # Programs per phase in units of the SM count: two CTAs per SM keep enough loads in flight to
    # approach HBM bandwidth with the small tiles decode uses (an estimate: no GPU run yet).
    programs_per_sm: int = 2
    # Each shrink program reduces at least this many `in` columns, so its fixed costs (launch of
    # the program, the fp32 partial write) stay small next to the `a` bytes it reads.
    min_k_chunk: int = 128
    # Splits never exceed this: the expand kernel re-reads every split's partial.
    max_split: int = 64
    # Above this rank the fused tiles degrade (16 x 16, one stage); torch's two GEMMs take over.
    max_fused_rank: int = 1024
    # Large M with R_PAD above this goes to torch's two GEMMs: the AOT audit (benchmarks/AOT_AUDIT.md)
    # shows R_PAD = 512 tiled tiles of 32 rows on mma.sync, no wgmma, and the cost model estimates
    # 255 us at 2048 -> 8192, M = 4096 against 75 us measured for cuBLAS (benchmarks/BASELINES.md 1).
    max_tiled_rank: int = 256
    # SM count the interpreter plans for (there is no GPU to ask): small, so that CPU tests
    # exercise multi-split, multi-group grids with few programs.
    interpreter_sms: int = 4
    # How a call with no forced scheme chooses between the Triton schemes and torch's two GEMMs:
    # a cost model (kernels/lowrank_cost.py) takes the scheme with the lowest estimate; None
    # takes the rules alone (decode_max_m, max_tiled_rank). The interpreter always plans by the
    # rules: it has no GPU time to model and exists to run the kernels (_lowrank_launch.plan_for).
    cost_model: LowrankCostModel | None = DEFAULT_COST_MODEL
    # Programmatic dependent launch of the split-K expand grid on sm_90+ (CUDA 12.3+ drivers): its
    # launch overlaps the shrink grid's tail (BASELINES.md: about 2 us per kernel boundary under
    # graph replay, an estimate of what it hides). False launches the two grids plainly.
    pdl: bool = True

    def __post_init__(self) -> None:
        checks.non_negative("decode_max_m", self.decode_max_m)
        if self.force_scheme is not None:
            checks.choice("force_scheme", self.force_scheme, SCHEMES)
        checks.positive("programs_per_sm", self.programs_per_sm)
        checks.positive("min_k_chunk", self.min_k_chunk)
        checks.positive("max_split", self.max_split)
        checks.integer("max_fused_rank", self.max_fused_rank, 1, 1024)
        checks.integer("max_tiled_rank", self.max_tiled_rank, 1, 1024)
        checks.positive("interpreter_sms", self.interpreter_sms)
        checks.boolean("pdl", self.pdl)
        if self.cost_model is not None and not isinstance(self.cost_model, LowrankCostModel):
            raise TypeError(f"cost_model {self.cost_model!r} is not a LowrankCostModel (or None for the rules)")
        # Hashed once: the eager path's signature hashes the tunables on every call.
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[no-any-return,attr-defined]

    def rules_only(self) -> LowrankTunables:
        """These tunables planning by the rules (no cost model); one shared object per tunables."""
        return self if self.cost_model is None else _rules_only(self)


@functools.cache
def _rules_only(tunables: LowrankTunables) -> LowrankTunables:
    return dataclasses.replace(tunables, cost_model=None)


DEFAULT_TUNABLES = LowrankTunables()


@dataclasses.dataclass(frozen=True)
class LowrankPlan:
    """One launch plan: the scheme and, for the Triton schemes, block sizes, split and grids."""

    scheme: str  # one of SCHEMES
    block_m: int = 0
    block_k: int = 0
    block_n: int = 0
    r_pad: int = 0
    n_split: int = 1  # splitk: `in` chunks, one fp32 partial each
    k_chunk: int = 0
    n_groups: int = 1  # programs sharing one M tile's `out` loop
    split_block: int = 1  # splitk: partials the expand kernel loads (and sums) at once
    num_warps: int = 4
    num_stages: int = 1
    grids: tuple[tuple[int, int, int], ...] = ()  # one 3-D grid per launch, in launch order
    ws_numel: int = 0  # fp32 partials a launch needs (allocated per launch)
    ws_rows: int = 0  # splitk: rows of each partial written and summed (1 for M = 1, else block_m)

    @property
    def triton(self) -> bool:
        return self.scheme in ("splitk", "tiled")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dense_is_cheaper(k: int, n: int, r: int) -> bool:
    """True when the rank-r factors hold at least as many elements as the dense ``n x k`` weight."""
    return r * (k + n) >= k * n


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """What one SM holds at once; the defaults are sm_90's (H100 / H200)."""

    registers: int = 65536
    shared_bytes: int = 233472  # 228 KB
    threads: int = 2048
    blocks: int = 32
    # Shared memory the driver reserves per resident CTA (sm_80 and later).
    reserved_shared_per_block: int = 1024


H100_LIMITS = SmLimits()


def ctas_per_sm(n_regs: int, shared_bytes: int, num_warps: int, limits: SmLimits = H100_LIMITS) -> int:
    """CTAs of a compiled kernel that fit on one SM at once (>= 1).

    Registers go to warps in units of 256 (a thread's count rounded up to 8); shared memory per
    CTA includes the driver's reservation; threads and the CTA cap bound the rest.
    """
    warp_regs = -(-max(1, n_regs) * 32 // 256) * 256
    by_regs = limits.registers // (warp_regs * num_warps)
    by_shared = limits.shared_bytes // (shared_bytes + limits.reserved_shared_per_block)
    by_threads = limits.threads // (32 * num_warps)
    return max(1, min(by_regs, by_shared, by_threads, limits.blocks))


def _index(device: torch.device) -> int:
    """The CUDA device's index (the current device for a bare ``cuda``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def device_limits(device: torch.device) -> SmLimits:
    """The SM limits of a CUDA device from torch's properties (sm_90's where torch does not say)."""
    props = torch.cuda.get_device_properties(_index(device))
    d = H100_LIMITS
    return SmLimits(
        registers=int(getattr(props, "regs_per_multiprocessor", d.registers)),
        shared_bytes=int(getattr(props, "shared_memory_per_multiprocessor", d.shared_bytes)),
        threads=int(getattr(props, "max_threads_per_multi_processor", d.threads)),
    )


@functools.cache
def device_supports_pdl(device: torch.device) -> bool:
    """True for a CUDA device of compute capability 9.0 or later (programmatic dependent launch)."""
    return torch.cuda.get_device_capability(_index(device))[0] >= 9


@functools.cache
def device_sms(device: torch.device) -> int:
    """SM count of a CUDA device (read once per device)."""
    return torch.cuda.get_device_properties(_index(device)).multi_processor_count


@functools.lru_cache(maxsize=4096)
def plan_lowrank(
    m: int,
    k: int,
    n: int,
    r: int,
    dtype: torch.dtype,
    sms: int,
    tunables: LowrankTunables = DEFAULT_TUNABLES,
    occupancy: tuple[int, ...] | None = None,
) -> LowrankPlan:
    """The plan for an ``(m x k)`` input, rank ``r``, ``n`` outputs on a device with ``sms`` SMs.

    Pure (cached on its arguments); no autotuning. ``m, k, n, r >= 1``. ``occupancy``: CTAs per
    SM of each launch's compiled kernel (:func:`ctas_per_sm`), once known: a launch then gets at
    most that many programs per SM (one wave); until then ``tunables.programs_per_sm``. Block
    sizes, warps and stages never depend on it (the binaries stay the same), only the grids: the
    split count and the column groups.
    """
    t = tunables
    forced = t.force_scheme
    if forced == "dense" or (forced is None and dense_is_cheaper(k, n, r)):
        return LowrankPlan("dense")
    if forced == "torch" or (forced is None and r > t.max_fused_rank) or r > 1024:
        return LowrankPlan("torch")
    if forced is None and t.cost_model is not None:
        estimates = scheme_estimates(m, k, n, r, dtype, sms, t)
        fused = min(("splitk", "tiled"), key=estimates.__getitem__)
        if estimates[fused] * t.cost_model.margin >= estimates["torch"]:
            return LowrankPlan("torch")
        return plan_lowrank(m, k, n, r, dtype, sms, dataclasses.replace(t, force_scheme=fused), occupancy)
    # tl.dot needs every dimension >= 16 and tl.arange a power of two.
    r_pad = max(16, _next_pow2(r))
    itemsize = 4 if dtype == torch.float32 else 2
    # Rank-side tiles (R_PAD x BLOCK_K of a, BLOCK_N x R_PAD of b) stay <= 32 KB per pipeline
    # stage: 64 columns up to R_PAD = 256 (16-bit), halved per doubling of R_PAD or of the
    # element size, never below tl.dot's 16.
    block_k = block_n = max(16, min(64, (32 * 1024) // (r_pad * itemsize)))
    # Programs per launch: programs_per_sm per SM, but never more than one wave of the compiled
    # kernel (a second wave of a few CTAs would double the launch's time).
    per_sm = [t.programs_per_sm] * 2 if occupancy is None else [min(t.programs_per_sm, o) for o in occupancy]
    target = per_sm[0] * sms  # programs of the first launch (shrink; tiled ignores it)
    target_second = per_sm[-1] * sms  # of the second (expand)
    decode = m <= t.decode_max_m
    if forced is None and not decode and r_pad > t.max_tiled_rank:
        return LowrankPlan("torch")
    if forced == "splitk" or (forced is None and decode):
        # Rows of the M tile: just enough for M (>= 16 for tl.dot), capped so the fp32 h tile
        # (BLOCK_M x R_PAD) stays <= 16K elements = 64 registers per thread at 8 warps.
        block_m = min(max(16, _next_pow2(m)), 64, max(16, 16384 // r_pad))
        n_m = -(-m // block_m)
        rows = min(m, block_m)
        n_groups = min(-(-n // block_n), max(1, target_second // n_m))
        # A shrink program reads A / n_split bytes of `a`; the expand programs each re-read every
        # split's fp32 partial (P = rows x R x 4 bytes): the sum is minimal at n_split = sqrt(A / P).
        balance = round(math.sqrt((k * r * itemsize) / (rows * r_pad * 4)))
        n_split = max(1, min(balance, k // t.min_k_chunk, target // n_m, t.max_split))
        k_chunk = _cdiv(_cdiv(k, n_split), block_k) * block_k  # ceil(k / n_split), rounded up to BLOCK_K
        n_split = max(1, -(-k // k_chunk))  # no empty splits
        # The expand kernel loads this many partials at once (independent loads in flight instead
        # of one dependent L2 round trip per split), within 8K fp32 elements (32 registers/thread
        # at 8 warps). For one row (decode) only that row of each partial is written and read:
        # at r = 128, 64 splits in one load instead of 4 a load over 16 loads.
        ws_rows = 1 if m == 1 else block_m
        split_block = max(1, min(_next_pow2(n_split), 8192 // (ws_rows * r_pad)))
        grids: tuple[tuple[int, int, int], ...] = ((n_m * n_split, 1, 1), (n_m * n_groups, 1, 1))
        scheme = "splitk"
        ws_numel = n_m * n_split * ws_rows * r_pad  # one row per partial at M = 1: 1/16 of a tile
    else:
        # Larger M tiles re-read `a` (from L2) fewer times; cap the fp32 h tile at 16K elements.
        block_m = min(64, max(16, 16384 // r_pad))
        n_m = -(-m // block_m)
        n_tiles = -(-n // block_n)
        # Recompute h in a few column groups only when the GPU would otherwise idle and in <= out
        # (benchmarks/BASELINES.md 1b: recomputation loses when in > out).
        n_groups = max(1, min(n_tiles, sms // max(1, n_m))) if k <= n else 1
        n_split, k_chunk, split_block, ws_rows = 1, k, 1, 0
        grids = ((n_m * n_groups, 1, 1),)
        scheme = "tiled"
        ws_numel = 0
    # 8 warps once the fp32 accumulator passes 4K elements (keeps it <= 64 registers/thread).
    num_warps = 8 if block_m * r_pad > 4096 else 4
    # Up to three stages (loads in flight to cover HBM latency) while the pipelined operand
    # buffers stay <= 96 KB: that leaves room for the layout conversion of h (up to 64 KB)
    # within an A100's 164 KB of shared memory per SM (227 KB on H100 / H200).
    per_stage = (max(block_k, block_n) * r_pad + block_m * block_k) * itemsize
    num_stages = max(1, min(3, (96 * 1024) // per_stage))
    return LowrankPlan(
        scheme,
        block_m,
        block_k,
        block_n,
        r_pad,
        n_split,
        k_chunk,
        n_groups,
        split_block,
        num_warps,
        num_stages,
        grids,
        ws_numel,
        ws_rows,
    )


def scheme_estimates(
    m: int, k: int, n: int, r: int, dtype: torch.dtype, sms: int, tunables: LowrankTunables = DEFAULT_TUNABLES
) -> dict[str, float]:
    """The cost model's graph-replay microseconds for each scheme the planner weighs (``r <= 1024``).

    ``"splitk"`` and ``"tiled"``: the plan each scheme would take, forced, at the assumed
    programs per SM (the choice never depends on occupancy, so re-sizing a grid after the first
    launch cannot change the scheme); ``"torch"``: cuBLAS's two GEMMs. The model is
    ``tunables.cost_model`` (the default model where it is None).
    """
    model = tunables.cost_model if tunables.cost_model is not None else DEFAULT_COST_MODEL
    out = {}
    for scheme in ("splitk", "tiled"):
        plan = plan_lowrank(m, k, n, r, dtype, sms, dataclasses.replace(tunables, force_scheme=scheme))
        out[scheme] = fused_us(plan, m, k, n, r, dtype, sms, model)
    out["torch"] = two_gemms_us(m, k, n, r, dtype, model)
    return out


__all__ = [
    "DEFAULT_TUNABLES",
    "H100_LIMITS",
    "LowrankPlan",
    "LowrankTunables",
    "SCHEMES",
    "SmLimits",
    "ctas_per_sm",
    "dense_is_cheaper",
    "device_limits",
    "device_sms",
    "device_supports_pdl",
    "plan_lowrank",
    "scheme_estimates",
]
