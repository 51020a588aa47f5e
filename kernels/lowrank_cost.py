"""Cost model of the low-rank linear's schemes on a GPU, the planner's basis for routing, and its fit.

:class:`LowrankCostModel` estimates the time of one call under CUDA-graph replay (kernel time, no
host cost) for each way of computing ``y = (x @ a.T) @ b.T``:

- :func:`fused_us`: a Triton plan (split-K's two launches or the tiled launch). Per launch the
  largest of: its HBM bytes at the copy bandwidth scaled by the share of SMs its grid fills, plus
  L2 re-reads; its FLOPs at the MMA rate its tiles reach (wgmma for 64-row M tiles of 16-bit
  operands, mma.sync below, FMA for fp32's IEEE products); its chain of dependent loop steps at
  one global-memory round trip each. Plus one kernel boundary per launch (split-K's expand grid
  its own constant: on sm_90+ it runs under programmatic dependent launch).
- :func:`two_gemms_us`: torch's ``(x @ a.T) @ b.T`` (cuBLAS), per GEMM a fixed cost plus the
  larger of its bytes at a share of the copy bandwidth and its FLOPs at the measured matmul peak
  scaled by ``s / (s + gemm_half_rate_dim)`` for its smallest dimension ``s`` (a K = 128 GEMM
  runs far below peak). bf16 runs bf16 GEMMs; fp16 and fp32 run fp32 GEMMs (the torch scheme
  keeps an fp16 intermediate out of fp16's range), fp16 paying its casts.

The defaults are the H200 of benchmarks/BASELINES.md: its measured copy bandwidth and matmul
peaks; the two-GEMM constants are a least-squares fit (in log time) to its 1b graph-replay times
and its M = 4096 times (within 10%); the fused kernels' constants (L2 bandwidth, MMA
efficiencies, boundary costs, round trip) are ASSUMPTIONS, since no GPU has timed the kernels.
:func:`fit` re-fits every constant from a benchmark's measured cells (``fasttrunc bench lowrank``
times both Triton schemes forced and the two GEMMs in every cell), so one GPU run calibrates it:
``python benchmarks/calibrate_lowrank.py OUT/lowrank.json``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fasttrunc import checks

if TYPE_CHECKING:
    from fasttrunc.kernels.lowrank_plan import LowrankPlan


@dataclasses.dataclass(frozen=True)
class LowrankCostModel:
    """Every constant of the estimate, named; see the module docstring for where each comes from."""

    # Measured on the H200 (benchmarks/BASELINES.md): device copy, bytes read + written.
    hbm_gbps: float = 4220.0
    # Measured: 8192^3 matmuls, bf16 (fp16 taken equal) and fp32 without TF32.
    matmul_tflops_16: float = 686.0
    matmul_tflops_32: float = 50.7
    # Assumed: L2 bandwidth for re-read factor tiles and split partials.
    l2_gbps: float = 10000.0
    # Assumed: the fused tiles' share of the matmul peak (wgmma at 64-row tiles, mma.sync below,
    # FMA for fp32's IEEE products).
    wgmma_efficiency: float = 0.5
    mma_sync_efficiency: float = 0.25
    fma_efficiency: float = 0.5
    # Assumed: one kernel boundary under graph replay (the drain of one grid, the ramp of the next).
    launch_us: float = 2.0
    # Assumed: the split-K expand grid's own boundary as the launcher runs it. On sm_90+ that grid
    # goes under programmatic dependent launch, which may hide part of it behind the shrink's tail;
    # no GPU has measured how much, so it is taken equal to launch_us (no credit) until a run's
    # split-K times fit it apart from the tiled kernel's one boundary.
    expand_launch_us: float = 2.0
    # Assumed: one dependent global-memory round trip per pipelined loop step.
    round_trip_us: float = 0.8
    # Fitted to BASELINES.md 1b and the M = 4096 rows of 1 (torch's two GEMMs, bf16).
    gemm_fixed_us: float = 3.4
    gemm_bandwidth: float = 0.72
    gemm_half_rate_dim: float = 32.0
    # A Triton scheme is chosen only when its estimate times this is below the two GEMMs' (1.0:
    # the cheaper estimate wins; above 1 demands a margin before leaving cuBLAS).
    margin: float = 1.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if name.endswith("_efficiency") or name == "gemm_bandwidth":
                checks.real(name, value, 0.0, 1.0, low_open=True)  # a share of a ceiling
            elif name.endswith("_us") or name == "gemm_half_rate_dim":
                checks.real(name, value, 0.0)  # a time or a size that may be zero
            else:
                checks.real(name, value, 0.0, low_open=True)  # a rate or the margin
            object.__setattr__(self, name, float(value))  # JSON's integers kept as floats

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LowrankCostModel:
        """The model from :meth:`to_dict`'s form; unknown keys get a one-line error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"cost model keys {unknown} are not constants; allowed: {', '.join(sorted(names))}")
        return cls(**data)


DEFAULT_COST_MODEL = LowrankCostModel()


def load_cost_model(path: str | Path) -> LowrankCostModel:
    """The model in a JSON file: ``calibrate_lowrank.py --json``'s output (its ``"fitted"``
    constants) or a plain object of constants; a one-line error for anything else."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cost model file {str(path)!r} cannot be read as JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("fitted"), dict):
        data = data["fitted"]
    if not isinstance(data, dict):
        raise ValueError(f"cost model file {str(path)!r} holds no object of constants")
    return LowrankCostModel.from_dict(data)


# Constants fit() adjusts, grouped by which measurements determine them.
GEMM_CONSTANTS = ("gemm_fixed_us", "gemm_bandwidth", "gemm_half_rate_dim")
FUSED_CONSTANTS = (
    "launch_us",
    "expand_launch_us",
    "round_trip_us",
    "l2_gbps",
    "wgmma_efficiency",
    "mma_sync_efficiency",
    "fma_efficiency",
)


def _itemsize(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def _peak_tflops(dtype: torch.dtype, model: LowrankCostModel) -> float:
    return model.matmul_tflops_32 if dtype == torch.float32 else model.matmul_tflops_16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fused_us(
    plan: LowrankPlan, m: int, k: int, n: int, r: int, dtype: torch.dtype, sms: int, model: LowrankCostModel
) -> float:
    """Estimated graph-replay microseconds of a Triton plan (``"splitk"`` or ``"tiled"``) on ``sms`` SMs."""
    if not plan.triton:
        raise ValueError(f"scheme {plan.scheme!r} is not a Triton plan; allowed: splitk, tiled")
    itemsize = _itemsize(dtype)
    if dtype == torch.float32:
        efficiency = model.fma_efficiency
    else:
        efficiency = model.wgmma_efficiency if plan.block_m >= 64 else model.mma_sync_efficiency
    rate = _peak_tflops(dtype, model) * efficiency * 1e6  # FLOP per us
    hbm, l2 = model.hbm_gbps * 1e3, model.l2_gbps * 1e3  # bytes per us
    flops_us = 2 * m * r * (k + n) / rate
    n_m = _cdiv(m, plan.block_m)
    if plan.scheme == "splitk":
        fill = [min(1.0, grid[0] / sms) for grid in plan.grids]
        partials = 4 * n_m * plan.n_split * plan.ws_rows * plan.r_pad  # fp32 rows written, then re-read
        shrink_bytes = itemsize * (m * k + r * k) + partials
        shrink_steps = _cdiv(plan.k_chunk, plan.block_k)
        shrink = max(shrink_bytes / (hbm * fill[0]), shrink_steps * model.round_trip_us)
        expand_bytes = itemsize * (r * n + m * n)
        reread = partials * plan.n_groups
        out_tiles = _cdiv(_cdiv(n, plan.block_n), plan.n_groups)
        expand_steps = _cdiv(plan.n_split, plan.split_block) + out_tiles
        expand = max(expand_bytes / (hbm * fill[1]) + reread / l2, expand_steps * model.round_trip_us)
        return shrink + expand + model.launch_us + model.expand_launch_us + flops_us
    programs = plan.grids[0][0]
    occupancy = min(1.0, programs / sms)
    hbm_bytes = itemsize * (m * k + r * (k + n) + m * n)
    l2_bytes = itemsize * (n_m * plan.n_groups * r * k + n_m * r * n)  # a and b re-read per M tile
    steps = _cdiv(k, plan.block_k) + _cdiv(_cdiv(n, plan.block_n), plan.n_groups)
    waves = _cdiv(programs, 2 * sms)
    memory = hbm_bytes / (hbm * occupancy) + l2_bytes / l2
    # A wave's programs overlap their round trips about four deep (pipelined stages, two CTAs per SM).
    return max(memory, flops_us, waves * steps * model.round_trip_us / 4) + model.launch_us


def _gemm_us(rows: int, inner: int, cols: int, itemsize: int, peak_tflops: float, model: LowrankCostModel) -> float:
    bytes_moved = itemsize * (rows * inner + inner * cols + rows * cols)
    smallest = min(rows, inner, cols)
    rate = peak_tflops * 1e6 * smallest / (smallest + model.gemm_half_rate_dim)
    return model.gemm_fixed_us + max(
        bytes_moved / (model.gemm_bandwidth * model.hbm_gbps * 1e3), 2 * rows * inner * cols / rate
    )


def two_gemms_us(m: int, k: int, n: int, r: int, dtype: torch.dtype, model: LowrankCostModel) -> float:
    """Estimated graph-replay microseconds of the ``"torch"`` scheme: cuBLAS's two GEMMs (and fp16's casts)."""
    if dtype == torch.bfloat16:
        peak = model.matmul_tflops_16
        return _gemm_us(m, k, r, 2, peak, model) + _gemm_us(m, r, n, 2, peak, model)
    peak = model.matmul_tflops_32
    total = _gemm_us(m, k, r, 4, peak, model) + _gemm_us(m, r, n, 4, peak, model)
    if dtype != torch.float32:
        # fp16: four casts (x, a and b up to fp32, y back down), each a launch that reads 2 bytes
        # and writes 4 per element (y the other way), charged like a GEMM's fixed cost and bytes.
        cast_bytes = 6 * (m * k + r * k + n * r + m * n)
        total += 4 * model.gemm_fixed_us + cast_bytes / (model.gemm_bandwidth * model.hbm_gbps * 1e3)
    return total


def plan_us(
    plan: LowrankPlan, m: int, k: int, n: int, r: int, dtype: torch.dtype, sms: int, model: LowrankCostModel
) -> float:
    """Estimate of a plan the fit measures: the Triton schemes by :func:`fused_us`, ``"torch"`` by
    :func:`two_gemms_us` (``"dense"`` is never weighed: the element count decides it)."""
    if plan.scheme == "torch":
        return two_gemms_us(m, k, n, r, dtype, model)
    return fused_us(plan, m, k, n, r, dtype, sms, model)


# --- fitting ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measured:
    """One measured time: ``scheme`` (``"torch"``, ``"splitk"`` or ``"tiled"``) of a cell, in microseconds."""

    scheme: str
    plan: LowrankPlan  # the plan that ran (torch: a plan of scheme "torch")
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    sms: int
    us: float


def log_error(model: LowrankCostModel, points: Sequence[Measured]) -> float:
    """Root-mean-square of ``ln(estimate / measured)`` over the points (0.1 ~ 10% typical error)."""
    if not points:
        return 0.0
    return math.sqrt(sum(v * v for v in _residuals(model, points)) / len(points))


def _residuals(model: LowrankCostModel, points: Sequence[Measured]) -> list[float]:
    """``ln(estimate / measured)`` per point."""
    return [math.log(plan_us(p.plan, p.m, p.k, p.n, p.r, p.dtype, p.sms, model) / p.us) for p in points]


# Multiplicative steps tried per constant and pass, coarse to fine.
_STEPS = (4.0, 2.0, 1.41, 1.19, 1.09, 1.04)
# Bounds each fitted constant stays within (fractions stay fractions).
_BOUNDS = {
    "gemm_fixed_us": (0.0, 50.0),
    "gemm_bandwidth": (0.05, 1.0),
    "gemm_half_rate_dim": (0.0, 4096.0),
    "launch_us": (0.0, 50.0),
    "expand_launch_us": (0.0, 50.0),
    "round_trip_us": (0.01, 20.0),
    "l2_gbps": (500.0, 100000.0),
    "wgmma_efficiency": (0.01, 1.0),
    "mma_sync_efficiency": (0.01, 1.0),
    "fma_efficiency": (0.01, 1.0),
}


def _descend(
    model: LowrankCostModel, names: Iterable[str], loss: Callable[[LowrankCostModel], float]
) -> LowrankCostModel:
    """Coordinate descent in log space over ``names``: per step size, every constant tries up and down."""
    best, best_loss = model, loss(model)
    names = tuple(names)
    for step in _STEPS:
        improved = True
        while improved:
            improved = False
            for name in names:
                low, high = _BOUNDS[name]
                value = getattr(best, name)
                # A zero (a fixed cost) cannot move by factors: it tries step - 1 instead.
                for candidate in (value * step, value / step) if value > 0 else (step - 1.0,):
                    candidate = min(high, max(low, candidate))
                    if candidate == value:
                        continue
                    trial = dataclasses.replace(best, **{name: candidate})
                    trial_loss = loss(trial)
                    if trial_loss < best_loss - 1e-12:
                        best, best_loss, improved = trial, trial_loss, True
                        value = candidate
    return best


def _refine(model: LowrankCostModel, names: Iterable[str], points: Sequence[Measured]) -> LowrankCostModel:
    """Levenberg-Marquardt in log space over the non-zero ``names``, from ``model``: it follows the
    narrow valleys that coordinate steps cross slowly (two boundary costs trading against each
    other). A step is taken only when it lowers the error; the bounds clamp every step."""
    names = tuple(name for name in names if getattr(model, name) > 0)
    if not names or not points:
        return model
    best, best_res = model, _residuals(model, points)
    best_loss = sum(v * v for v in best_res)
    damping, h = 1e-3, 1e-5
    for _ in range(60):
        columns = []
        for name in names:  # one-sided differences in ln(constant), backward at an upper bound
            value = getattr(best, name)
            step = h if value * math.exp(h) <= _BOUNDS[name][1] else -h
            moved = dataclasses.replace(best, **{name: value * math.exp(step)})
            columns.append([(a - b) / step for a, b in zip(_residuals(moved, points), best_res)])
        jac = torch.tensor(columns, dtype=torch.float64).T  # points x names
        res = torch.tensor(best_res, dtype=torch.float64)
        normal, grad = jac.T @ jac, jac.T @ res
        taken = False
        while damping < 1e8 and not taken:
            system = normal + damping * torch.diag(torch.diagonal(normal)) + 1e-12 * torch.eye(len(names))
            delta = torch.linalg.solve(system, -grad).tolist()
            changes = {}
            for name, d in zip(names, delta):
                low, high = _BOUNDS[name]
                changes[name] = min(high, max(low, getattr(best, name) * math.exp(max(-2.0, min(2.0, d)))))
            trial = dataclasses.replace(best, **changes)
            trial_res = _residuals(trial, points)
            trial_loss = sum(v * v for v in trial_res)
            if trial_loss < best_loss - 1e-15:
                gain = best_loss - trial_loss
                best, best_res, best_loss, taken = trial, trial_res, trial_loss, True
                damping = max(1e-9, damping / 3)
                if gain < 1e-14:
                    return best
            else:
                damping *= 4
        if not taken:
            break
    return best


def fit(points: Sequence[Measured], start: LowrankCostModel = DEFAULT_COST_MODEL) -> LowrankCostModel:
    """The model whose estimates best match ``points`` (least squares in log time).

    The two-GEMM constants are fitted to the ``"torch"`` points, the fused kernels' to the
    Triton points; the measured ceilings (bandwidth, peaks) and the margin stay as in ``start``.
    A group with no points keeps ``start``'s values. Deterministic (coordinate descent from
    ``start``, then Levenberg-Marquardt steps from there), and never worse than ``start`` on the points.
    """
    gemm = [p for p in points if p.scheme == "torch"]
    fused = [p for p in points if p.scheme in ("splitk", "tiled")]
    bad = sorted({p.scheme for p in points} - {"torch", "splitk", "tiled"})
    if bad:
        raise ValueError(f"measured schemes {bad} cannot be fitted; allowed: torch, splitk, tiled")
    for p in points:
        if not (math.isfinite(p.us) and p.us > 0):
            raise ValueError(f"measured time {p.us!r} us of {p.scheme} is not a positive finite number")
    model = start
    if gemm:
        model = _descend(model, GEMM_CONSTANTS, lambda mdl: log_error(mdl, gemm))
        model = _refine(model, GEMM_CONSTANTS, gemm)
    if fused:
        used = [name for name in FUSED_CONSTANTS if _used(name, fused)]
        model = _descend(model, used, lambda mdl: log_error(mdl, fused))
        model = _refine(model, used, fused)
    return model


def _used(name: str, points: Sequence[Measured]) -> bool:
    """Whether a fused constant can affect any point (an efficiency of tiles no point ran is left alone)."""
    if name == "expand_launch_us":
        return any(p.scheme == "splitk" for p in points)
    if name == "fma_efficiency":
        return any(p.dtype == torch.float32 for p in points)
    if name == "wgmma_efficiency":
        return any(p.dtype != torch.float32 and p.plan.block_m >= 64 for p in points)
    if name == "mma_sync_efficiency":
        return any(p.dtype != torch.float32 and p.plan.block_m < 64 for p in points)
    return True


__all__ = [
    "DEFAULT_COST_MODEL",
    "FUSED_CONSTANTS",
    "GEMM_CONSTANTS",
    "LowrankCostModel",
    "Measured",
    "fit",
    "fused_us",
    "load_cost_model",
    "log_error",
    "plan_us",
    "two_gemms_us",
]
