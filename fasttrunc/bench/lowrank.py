"""Benchmark of the fused low-rank linear against torch, on the MLP shapes of Pythia (CUDA).

For every cell (in -> out, rank r, rows M) of the grid, in one run on one card:
1. correctness first: the fused kernel against the fp32 torch reference on fresh random inputs,
   relative Frobenius error; a cell over its dtype's bound is reported and not timed;
2. three ways of computing ``y``, each timed twice:
   - ``dense``: ``F.linear(x, W)`` with the full ``W = b @ a``;
   - ``two GEMMs``: torch ``(x @ A) @ B`` with ``A = a.T``, ``B = b.T`` (two cuBLAS launches);
   - ``fused``: ``fasttrunc.lowrank_linear(x, a, b)`` (the public functional, checks included,
     with the scheme its planner picks: on CUDA the cost model's, cuBLAS's two GEMMs included);
   ``graph``: kernel time under CUDA-graph replay (``triton.testing.do_bench_cudagraph``, median);
   ``eager``: wall-clock per call of back-to-back calls with no sync in between, what a
   ``generate()`` loop sees (host launch cost and GPU time overlap; median of ``reps`` loops);
   with ``compare_schemes``, the fused kernel is also checked and graph-timed with each scheme
   forced (split-K and tiled; tunables passed explicitly), the data that sets ``decode_max_m``;
   every timed call cycles through ``rotate`` weight sets, so that decode cells read HBM, not L2;
   the graph-replayed output is checked again against the reference;
3. the byte / FLOP floor of benchmarks/BASELINES.md: ``max(bytes / copy bandwidth, flops / matmul peak)``
   with bytes = ``size * (M*in + in*r + r*out + M*out)`` and flops = ``2*M*r*(in + out)``, where
   the copy bandwidth and the matmul peak are measured in the same run on the same card.

The issue's targets are checked in the summary: geometric-mean speedup over two GEMMs >= 1.5x
under graphs with no cell below 1.0x, >= 1.3x eager, and >= 75% of the floor at M = 4096.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.kernels import lowrank_cost
from fasttrunc.kernels.lowrank_plan import DEFAULT_TUNABLES, LowrankPlan, LowrankTunables
from fasttrunc.runs import DTYPES, Progress, ResultMixin, parse_dtype, report, synchronize

# label -> (in, out): the MLP matrices of Pythia-1.4b and Pythia-12b.
PYTHIA_SHAPES = {
    "1.4b h_to_4h": (2048, 8192),
    "1.4b 4h_to_h": (8192, 2048),
    "12b h_to_4h": (5120, 20480),
}
DEFAULT_RANKS = (32, 128, 512)
DEFAULT_MS = (1, 16, 256, 4096)
# benchmarks/BASELINES.md, H200, bf16: torch's two GEMMs, (in, out, r, M) -> us. Section 1b under
# CUDA-graph replay; and section 1's r = 512, M = 4096 rows, eager, where launch cost is a few
# percent of the time. The two-GEMM constants of the cost model are fitted to both.
H200_TWO_GEMMS_GRAPH_US = {
    (2048, 8192, 128, 1): 7.3, (2048, 8192, 128, 256): 9.0, (2048, 8192, 128, 4096): 36.2, (8192, 2048, 128, 1): 8.5,
    (8192, 2048, 128, 4096): 33.5, (5120, 20480, 128, 1): 9.3, (5120, 20480, 128, 4096): 81.0,
    (2048, 8192, 32, 1): 7.0, (2048, 8192, 32, 4096): 34.8,
}  # fmt: skip
H200_TWO_GEMMS_LARGE_EAGER_US = {
    (2048, 8192, 512, 4096): 75.4,
    (8192, 2048, 512, 4096): 71.5,
    (5120, 20480, 512, 4096): 186.2,
}
TARGETS = {"graph_geomean": 1.5, "graph_min": 1.0, "eager_geomean": 1.3, "floor_pct_at_4096": 75.0}


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"2048x8192,8192x2048"`` -> ((2048, 8192), (8192, 2048)); one-line ValueError otherwise."""
    shapes = []
    for item in (s.strip() for s in text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"shape {item!r} is not IN x OUT (e.g. 2048x8192); use comma-separated INxOUT pairs")
        shapes.append((int(parts[0]), int(parts[1])))
    return tuple(shapes)


def parse_ints(name: str, text: str) -> tuple[int, ...]:
    """``"1,16,256"`` -> (1, 16, 256); one-line ValueError naming ``name`` otherwise."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a comma-separated list of integers") from None


@dataclasses.dataclass(frozen=True)
class LowrankBenchConfig:
    """The grid and timing settings; validated on construction (one-line ValueError)."""

    shapes: tuple[tuple[int, int], ...] = tuple(PYTHIA_SHAPES.values())
    ranks: tuple[int, ...] = DEFAULT_RANKS
    ms: tuple[int, ...] = DEFAULT_MS
    dtype: str = "bfloat16"
    reps: int = 5  # eager: timed loops per variant, the median is reported
    calls: int = 200  # eager: back-to-back calls per timed loop
    graph_ms: int = 50  # do_bench_cudagraph's `rep`: milliseconds of replays per measurement
    compare_schemes: bool = True  # also graph-time the fused kernel with each scheme forced
    # Distinct weight sets cycled through by the timed calls, so that decode cells (weights of a
    # few MB) read HBM as a model's layers do, not an L2-resident copy (H200: 60 MB of L2).
    rotate: int = 8
    seed: int = 0
    device: str = "cuda"
    tunables: LowrankTunables = DEFAULT_TUNABLES

    def __post_init__(self) -> None:
        checks.choice("dtype", self.dtype, DTYPES)
        for name in ("shapes", "ranks", "ms"):
            checks.non_empty(name, getattr(self, name))
        for k, n in self.shapes:
            checks.integer("in_features", k, 1, 1 << 16)
            checks.integer("out_features", n, 1, 1 << 16)
        for r in self.ranks:
            checks.integer("rank", r, 1, 1024)
            for k, n in self.shapes:
                if r > min(k, n):
                    raise ValueError(f"rank {r} is out of range for the shape {k}x{n}; allowed: 1..{min(k, n)}")
        for m in self.ms:
            checks.integer("M (rows)", m, 1, 65536)
        checks.integer("reps", self.reps, 1, 100)
        checks.integer("calls", self.calls, 1, 100000)
        checks.integer("graph_ms", self.graph_ms, 1, 10000)
        checks.integer("rotate", self.rotate, 1, 64)
        if not isinstance(self.tunables, LowrankTunables):
            raise TypeError(f"tunables {self.tunables!r} is not a LowrankTunables")


@dataclasses.dataclass
class LowrankBenchResult(ResultMixin):
    config: LowrankBenchConfig
    device: str
    ceilings: dict[str, float]  # copy GB/s (read + written) and matmul TFLOP/s, measured here
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    sms: int = 0  # the SM count the planner planned for (the interpreter's stand-in off CUDA)


def _eager_us(fn: Callable[[], Any], calls: int, reps: int, device: torch.device) -> float:
    """Median over ``reps`` loops of the wall-clock microseconds per call of ``calls`` calls."""
    fn()
    synchronize(device)
    loops = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        loops.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(loops)


def _graph_us(fn: Callable[[], Any], graph_ms: int, device: torch.device) -> float | None:
    """Median microseconds per call under CUDA-graph replay; None off CUDA."""
    if device.type != "cuda":
        return None
    import triton.testing

    return 1e3 * float(triton.testing.do_bench_cudagraph(fn, rep=graph_ms, return_mode="median"))


def _replayed_error(fn: Callable[[], torch.Tensor], ref: torch.Tensor, device: torch.device) -> float | None:
    """Relative error of ``fn``'s output after capture and two replays (None off CUDA)."""
    if device.type != "cuda":
        return None
    fn()
    synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    y.zero_()
    graph.replay()
    graph.replay()
    synchronize(device)
    return float(((y.float() - ref).norm() / ref.norm()).item())


class _Cycle:
    """A callable that runs ``fn(*operands[i])`` for i = 0, 1, 2, ... cyclically (weight rotation)."""

    def __init__(self, fn: Callable[..., torch.Tensor], operands: list[tuple[Any, ...]]) -> None:
        self.fn, self.operands, self.i = fn, operands, 0

    def __call__(self) -> torch.Tensor:
        args = self.operands[self.i]
        self.i = (self.i + 1) % len(self.operands)
        return self.fn(*args)


def _forced_scheme_us(
    scheme: str,
    cycle: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ref: torch.Tensor,
    config: LowrankBenchConfig,
) -> float | None:
    """Graph time of the fused kernel with ``scheme`` forced; None when it fails the check."""
    from fasttrunc.kernels.lowrank import lowrank_linear
    from fasttrunc.kernels.tolerances import lowrank_rtol

    tunables = dataclasses.replace(config.tunables, force_scheme=scheme)
    x, a, b = cycle[0]
    got = lowrank_linear(x, a, b, tunables=tunables).float()
    if not (got - ref).norm().item() / ref.norm().item() < lowrank_rtol(x.dtype):
        return None

    def forced(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, a, b, tunables=tunables)

    return _graph_us(_Cycle(forced, list(cycle)), config.graph_ms, x.device)


def _ceilings(dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) and an 8192^3 matmul's TFLOP/s."""
    if device.type != "cuda":
        return {"copy_gbps": math.nan, "matmul_tflops": math.nan}
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB: far beyond any L2
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    size = 8192
    p = torch.randn(size, size, device=device).to(dtype)
    q = torch.randn(size, size, device=device).to(dtype)
    mm_ms = triton.testing.do_bench(lambda: p @ q, return_mode="median")
    return {"copy_gbps": 2 * src.numel() / (copy_ms * 1e-3) / 1e9, "matmul_tflops": 2 * size**3 / (mm_ms * 1e-3) / 1e12}


def _floor_us(m: int, k: int, n: int, r: int, itemsize: int, ceilings: dict[str, float]) -> float:
    bytes_moved = itemsize * (m * k + k * r + r * n + m * n)
    flops = 2 * m * r * (k + n)
    return 1e6 * max(bytes_moved / (ceilings["copy_gbps"] * 1e9), flops / (ceilings["matmul_tflops"] * 1e12))


def estimate_fused_us(plan: LowrankPlan, m: int, k: int, n: int, r: int, itemsize: int, sms: int = 132) -> float | None:
    """The cost model's graph-replay estimate (us) of a Triton plan on an H200; None for the torch schemes.

    :func:`fasttrunc.kernels.lowrank_cost.fused_us` with the default model; ``itemsize`` 2 is
    bf16, 4 fp32.
    """
    if not plan.triton:
        return None
    dtype = torch.float32 if itemsize == 4 else torch.bfloat16
    return lowrank_cost.fused_us(plan, m, k, n, r, dtype, sms, lowrank_cost.DEFAULT_COST_MODEL)


def _geomean(values: list[float]) -> float | None:
    kept = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in kept) / len(kept)) if kept else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [row for row in rows if row["correct"]]
    graph = [row["speedup_graph"] for row in timed if row["speedup_graph"] is not None]
    eager = [row["speedup_eager"] for row in timed if row["speedup_eager"] is not None]
    floor = [row["floor_pct"] for row in timed if row["m"] == 4096 and row["floor_pct"] is not None]
    out = {
        "cells": len(rows),
        "incorrect_cells": len(rows) - len(timed),
        "graph_geomean": _geomean(graph),
        "graph_min": min(graph) if graph else None,
        "eager_geomean": _geomean(eager),
        "floor_pct_at_4096_min": min(floor) if floor else None,
    }
    checks = {
        "graph_geomean": out["graph_geomean"] is not None and out["graph_geomean"] >= TARGETS["graph_geomean"],
        "graph_min": out["graph_min"] is not None and out["graph_min"] >= TARGETS["graph_min"],
        "eager_geomean": out["eager_geomean"] is not None and out["eager_geomean"] >= TARGETS["eager_geomean"],
        "floor_pct_at_4096": bool(floor) and min(floor) >= TARGETS["floor_pct_at_4096"],
    }
    out["targets"] = TARGETS
    out["met"] = checks
    out["all_met"] = out["incorrect_cells"] == 0 and all(checks.values())
    return out


def _cell_operands(
    m: int, k: int, n: int, r: int, dtype: torch.dtype, copies: int, gen: torch.Generator, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``copies`` (x, a, b) sets: one input, distinct weights (rotated by the timed calls)."""
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    out = []
    for _ in range(copies):
        a = (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(device=device, dtype=dtype)
        b = (torch.randn(n, r, generator=gen) / math.sqrt(r)).to(device=device, dtype=dtype)
        out.append((x, a, b))
    return out


def _two_gemms(x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    return (x @ at) @ bt


def _time_variant(
    fn: Callable[..., torch.Tensor], operands: list[tuple[Any, ...]], config: LowrankBenchConfig, device: torch.device
) -> tuple[float, float | None]:
    cycle = _Cycle(fn, operands)
    return _eager_us(cycle, config.calls, config.reps, device), _graph_us(cycle, config.graph_ms, device)


def _copies(k: int, n: int, r: int, itemsize: int, rotate: int) -> int:
    """Weight sets to rotate through: enough to exceed 64 MB (above an H200's L2), at most ``rotate``."""
    per_set = itemsize * (r * (k + n) + k * n)  # factors and the dense weight
    return max(1, min(rotate, -(-(64 << 20) // per_set)))


def run(config: LowrankBenchConfig, progress: Progress = None) -> LowrankBenchResult:
    """Check and time every cell of the grid; see the module docstring.

    Meant for CUDA; ``device="cpu"`` runs only under ``TRITON_INTERPRET=1`` (graph times and
    ceilings are then absent), to test the benchmark itself with tiny grids.
    """
    import torch.nn.functional as F

    from fasttrunc.kernels._backend import use_triton
    from fasttrunc.kernels._lowrank_launch import _sms, plan_for
    from fasttrunc.kernels.lowrank import lowrank_linear, lowrank_linear_reference
    from fasttrunc.kernels.lowrank_plan import scheme_estimates
    from fasttrunc.kernels.tolerances import lowrank_rtol
    from fasttrunc.runs import resolve_device

    device = resolve_device(config.device)
    if not use_triton(torch.empty(0, device=device)):
        raise ValueError(
            f"device {config.device!r} cannot run the Triton kernels; the low-rank benchmark needs a CUDA device"
        )
    dtype = parse_dtype(config.dtype)
    rtol = lowrank_rtol(dtype)
    tunables = config.tunables
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    cells = [(k, n, r, m) for k, n in config.shapes for r in config.ranks for m in config.ms]
    report(progress, "bench lowrank", 0, len(cells) + 1, "ceilings")
    ceilings = _ceilings(dtype, device)
    labels = {shape: label for label, shape in PYTHIA_SHAPES.items()}
    sms = _sms(device, tunables)
    rows: list[dict[str, Any]] = []

    def fused(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, a, b, tunables=tunables)

    with torch.no_grad():
        for i, (k, n, r, m) in enumerate(cells):
            report(progress, "bench lowrank", i + 1, len(cells) + 1, f"{k}->{n} r={r} M={m}")
            itemsize = torch.finfo(dtype).bits // 8
            operands = _cell_operands(m, k, n, r, dtype, _copies(k, n, r, itemsize, config.rotate), gen, device)
            x, a, b = operands[0]
            ref = lowrank_linear_reference(x, a, b).float()
            rel_err = ((fused(x, a, b).float() - ref).norm() / ref.norm()).item()
            plan: LowrankPlan = plan_for(m, k, n, r, dtype, device, tunables)
            estimates = scheme_estimates(m, k, n, r, dtype, sms, tunables)  # the config holds r <= 1024
            row: dict[str, Any] = {
                "shape": labels.get((k, n), f"{k}->{n}"),
                "in": k,
                "out": n,
                "r": r,
                "m": m,
                "scheme": plan.scheme,
                "grid": [list(g) for g in plan.grids],
                # The cost model's graph-replay estimates (us) per scheme, beside what was measured.
                "estimate_us": estimates,
                "rel_err": rel_err,
                "correct": math.isfinite(rel_err) and rel_err < rtol,
            }
            replayed = _replayed_error(functools.partial(fused, x, a, b), ref, device)
            row["replay_rel_err"] = replayed
            if replayed is not None and not replayed < rtol:
                row["correct"] = False
            dense = [(x_, (b_.float() @ a_.float()).to(dtype)) for x_, a_, b_ in operands]
            variants: dict[str, tuple[Callable[..., torch.Tensor], list[tuple[Any, ...]]]] = {
                "dense": (F.linear, list(dense)),
                "two_gemms": (_two_gemms, [(x_, a_.T, b_.T) for x_, a_, b_ in operands]),
                "fused": (fused, list(operands)),
            }
            for name, (fn, args) in variants.items():
                if not row["correct"]:
                    row[f"{name}_eager_us"] = row[f"{name}_graph_us"] = None
                    continue
                row[f"{name}_eager_us"], row[f"{name}_graph_us"] = _time_variant(fn, args, config, device)
            for scheme in ("splitk", "tiled") if config.compare_schemes else ():
                row[f"{scheme}_graph_us"] = _forced_scheme_us(scheme, operands, ref, config) if row["correct"] else None
            floor = _floor_us(m, k, n, r, itemsize, ceilings)
            row["floor_us"] = floor if math.isfinite(floor) else None
            fused_graph, fused_eager = row["fused_graph_us"], row["fused_eager_us"]
            gemm_graph, gemm_eager = row["two_gemms_graph_us"], row["two_gemms_eager_us"]
            row["speedup_graph"] = gemm_graph / fused_graph if fused_graph and gemm_graph else None
            row["speedup_eager"] = gemm_eager / fused_eager if fused_eager and gemm_eager else None
            row["floor_pct"] = 100 * row["floor_us"] / fused_graph if fused_graph and row["floor_us"] else None
            rows.append(row)
            del operands, dense, variants, x, a, b, ref
    report(progress, "bench lowrank", len(cells) + 1, len(cells) + 1, "done")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return LowrankBenchResult(config, name, ceilings, rows, _summary(rows), sms)


def table_rows(result: LowrankBenchResult) -> tuple[list[str], list[list[str]]]:
    """Columns and formatted rows of the ratio table (shared by the CLI and the script)."""

    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    columns = [
        "shape",
        "r",
        "M",
        "scheme",
        "err",
        "dense eager",
        "2-GEMM eager",
        "planned eager",
        "eager x",
        "dense graph",
        "2-GEMM graph",
        "planned graph",
        "graph x",
        "floor",
        "% floor",
    ]
    compared = result.config.compare_schemes
    if compared:
        columns += ["split-K graph", "tiled graph"]
    rows = []
    for row in result.rows:
        cells = [
            row["shape"],
            str(row["r"]),
            str(row["m"]),
            row["scheme"],
            f"{row['rel_err']:.1e}",
            us(row["dense_eager_us"]),
            us(row["two_gemms_eager_us"]),
            us(row["fused_eager_us"]),
            ratio(row["speedup_eager"]),
            us(row["dense_graph_us"]),
            us(row["two_gemms_graph_us"]),
            us(row["fused_graph_us"]),
            ratio(row["speedup_graph"]),
            us(row["floor_us"]),
            "-" if row["floor_pct"] is None else f"{row['floor_pct']:.0f}%",
        ]
        if compared:
            cells += [us(row.get("splitk_graph_us")), us(row.get("tiled_graph_us"))]
        rows.append(cells)
    return columns, rows


def summary_lines(result: LowrankBenchResult) -> list[str]:
    """The summary against the issue's targets, one line each."""
    s = result.summary

    def fmt(v: float | None, unit: str) -> str:
        return "-" if v is None else f"{v:.2f}{unit}"

    met = {True: "met", False: "NOT met"}
    c = result.ceilings
    return [
        f"device: {result.device}; dtype {result.config.dtype}; times in microseconds; "
        f"ceilings measured here: copy {c['copy_gbps']:.0f} GB/s, matmul {c['matmul_tflops']:.0f} TFLOP/s",
        f"cells: {s['cells']}, failing the correctness check (not timed): {s['incorrect_cells']}",
        f"graph speedup over two GEMMs: geomean {fmt(s['graph_geomean'], 'x')} (target >= 1.5x, "
        f"{met[s['met']['graph_geomean']]}), min {fmt(s['graph_min'], 'x')} (target >= 1.0x, {met[s['met']['graph_min']]})",
        f"eager speedup over two GEMMs: geomean {fmt(s['eager_geomean'], 'x')} (target >= 1.3x, "
        f"{met[s['met']['eager_geomean']]})",
        f"M = 4096, worst share of the floor: {fmt(s['floor_pct_at_4096_min'], '%')} (target >= 75%, "
        f"{met[s['met']['floor_pct_at_4096']]})",
    ]


# --- calibration of the planner's cost model from a benchmark run --------------------------------


def _run_context(data: dict[str, Any]) -> tuple[torch.dtype, int, LowrankTunables]:
    """(dtype, SM count, the run's tunables planning by the rules) of a benchmark JSON; one-line errors."""
    config = data.get("config")
    if not isinstance(config, dict) or "rows" not in data:
        raise ValueError("the benchmark JSON has no config or rows; pass the file bench_lowrank.py --json wrote")
    sms = int(data.get("sms") or 0)
    if sms < 1:
        raise ValueError(
            f"the benchmark JSON's sms {data.get('sms')!r} is not a positive SM count (a run before calibration existed?)"
        )
    saved = dict(config.get("tunables") or {})
    saved.pop("cost_model", None)
    saved.pop("force_scheme", None)
    return parse_dtype(config["dtype"]), sms, LowrankTunables(**saved, cost_model=None)


def measured_points(data: dict[str, Any]) -> list[lowrank_cost.Measured]:
    """The graph-replay times of a benchmark result (its ``to_dict()`` form, as the JSON holds it).

    Per correct cell: the two GEMMs as ``"torch"``, and each forced Triton scheme that was timed,
    with the plan it takes at the assumed programs per SM (the plan the planner's estimates use).
    """
    from fasttrunc.kernels.lowrank_plan import plan_lowrank

    dtype, sms, base = _run_context(data)
    points = []
    for row in data["rows"]:
        if not row.get("correct"):
            continue
        m, k, n, r = row["m"], row["in"], row["out"], row["r"]
        for scheme, field in (
            ("torch", "two_gemms_graph_us"),
            ("splitk", "splitk_graph_us"),
            ("tiled", "tiled_graph_us"),
        ):
            us = row.get(field)
            if us is None:
                continue
            plan = plan_lowrank(m, k, n, r, dtype, sms, dataclasses.replace(base, force_scheme=scheme))
            points.append(lowrank_cost.Measured(scheme, plan, m, k, n, r, dtype, sms, float(us)))
    return points


def calibrate(
    data: dict[str, Any], start: lowrank_cost.LowrankCostModel = lowrank_cost.DEFAULT_COST_MODEL
) -> dict[str, Any]:
    """Fit the cost model to a benchmark result and say what the fitted model would route where.

    Returns the fitted constants, the RMS log error of the start and the fitted model on the
    measured points, and per cell the scheme each model picks with the measured time of that
    scheme (where it was timed): the data to decide whether the new constants go into
    ``DEFAULT_COST_MODEL``.
    """
    from fasttrunc.kernels.lowrank_plan import plan_lowrank

    dtype, sms, base = _run_context(data)
    points = measured_points(data)
    fitted = lowrank_cost.fit(points, start)
    by_cell: dict[tuple[int, int, int, int], dict[str, float]] = {}
    by_scheme: dict[str, list[lowrank_cost.Measured]] = {"torch": [], "splitk": [], "tiled": []}
    for p in points:
        by_cell.setdefault((p.m, p.k, p.n, p.r), {})[p.scheme] = p.us
        by_scheme[p.scheme].append(p)
    cells = []
    for (m, k, n, r), times in sorted(
        by_cell.items(), key=lambda item: (item[0][1], item[0][2], item[0][3], item[0][0])
    ):
        row: dict[str, Any] = {"m": m, "in": k, "out": n, "r": r, "measured_us": times}
        for name, model in (("start", start), ("fitted", fitted)):
            # The run's own tunables (min_k_chunk, ...), planning by this model.
            scheme = plan_lowrank(m, k, n, r, dtype, sms, dataclasses.replace(base, cost_model=model)).scheme
            row[f"{name}_scheme"] = scheme
            row[f"{name}_speedup"] = times["torch"] / times[scheme] if scheme in times and "torch" in times else None
        best = min(times, key=times.__getitem__)
        row["best_measured"] = best
        cells.append(row)

    def geomean(key: str) -> float | None:
        return _geomean([c[key] for c in cells if c[key] is not None])

    return {
        "points": len(points),
        "start": start.to_dict(),
        "fitted": fitted.to_dict(),
        "rms_log_error": {
            name: {s: lowrank_cost.log_error(model, group) for s, group in by_scheme.items()}
            for name, model in (("start", start), ("fitted", fitted))
        },
        "cells": cells,
        "graph_geomean": {"start": geomean("start_speedup"), "fitted": geomean("fitted_speedup")},
    }
