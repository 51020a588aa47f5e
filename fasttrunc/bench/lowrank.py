"""Benchmark of the fused low-rank linear against torch, on the MLP shapes of Pythia (CUDA).

For every cell (in -> out, rank r, rows M) of the grid, in one run on one card:
1. correctness first: the fused kernel against the fp32 torch reference on fresh random inputs,
   relative Frobenius error; a cell over its dtype's bound is reported and not timed;
2. three ways of computing ``y``, each timed twice:
   - ``dense``: ``F.linear(x, W)`` with the full ``W = b @ a``;
   - ``two GEMMs``: torch ``(x @ A) @ B`` with ``A = a.T``, ``B = b.T`` (two cuBLAS launches);
   - ``fused``: ``fasttrunc.lowrank_linear(x, a, b)`` (the public functional, checks included);
   ``graph``: kernel time under CUDA-graph replay (``triton.testing.do_bench_cudagraph``, median);
   ``eager``: wall-clock per call of back-to-back calls with no sync in between, what a
   ``generate()`` loop sees (host launch cost and GPU time overlap; median of ``reps`` loops);
   with ``compare_schemes``, the fused kernel is also checked and graph-timed with each scheme
   forced (split-K and tiled), the data that sets ``DECODE_MAX_M``;
3. the byte / FLOP floor of BASELINES.md: ``max(bytes / copy bandwidth, flops / matmul peak)``
   with bytes = ``size * (M*in + in*r + r*out + M*out)`` and flops = ``2*M*r*(in + out)``, where
   the copy bandwidth and the matmul peak are measured in the same run on the same card.

The issue's targets are checked in the summary: geometric-mean speedup over two GEMMs >= 1.5x
under graphs with no cell below 1.0x, >= 1.3x eager, and >= 75% of the floor at M = 4096.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from fasttrunc.runs import Progress, ResultMixin, report

# label -> (in, out): the MLP matrices of Pythia-1.4b and Pythia-12b.
PYTHIA_SHAPES = {
    "1.4b h_to_4h": (2048, 8192),
    "1.4b 4h_to_h": (8192, 2048),
    "12b h_to_4h": (5120, 20480),
}
DEFAULT_RANKS = (32, 128, 512)
DEFAULT_MS = (1, 16, 256, 4096)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Correctness bounds (relative Frobenius error vs the fp32 reference), as in the kernel tests.
_RTOL = {"bfloat16": 2e-2, "float16": 3e-3, "float32": 1e-5}
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


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} {value!r} is outside {lo}..{hi}")


@dataclasses.dataclass
class LowrankBenchConfig:
    shapes: tuple[tuple[int, int], ...] = tuple(PYTHIA_SHAPES.values())
    ranks: tuple[int, ...] = DEFAULT_RANKS
    ms: tuple[int, ...] = DEFAULT_MS
    dtype: str = "bfloat16"
    reps: int = 5  # eager: timed loops per variant, the median is reported
    calls: int = 200  # eager: back-to-back calls per timed loop
    graph_ms: int = 50  # do_bench_cudagraph's `rep`: milliseconds of replays per measurement
    compare_schemes: bool = True  # also graph-time the fused kernel with each scheme forced
    seed: int = 0
    device: str = "cuda"

    def validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; allowed: {', '.join(_DTYPES)}")
        if not self.shapes or not self.ranks or not self.ms:
            raise ValueError("shapes, ranks and ms must each name at least one value")
        for k, n in self.shapes:
            _check_int("in_features", k, 1, 1 << 16)
            _check_int("out_features", n, 1, 1 << 16)
        for r in self.ranks:
            _check_int("rank", r, 1, 1024)
            for k, n in self.shapes:
                if r > min(k, n):
                    raise ValueError(f"rank {r} is outside 1..{min(k, n)} for the shape {k}x{n}")
        for m in self.ms:
            _check_int("M (rows)", m, 1, 65536)
        _check_int("reps", self.reps, 1, 100)
        _check_int("calls", self.calls, 1, 100000)
        _check_int("graph_ms", self.graph_ms, 1, 10000)


@dataclasses.dataclass
class LowrankBenchResult(ResultMixin):
    config: LowrankBenchConfig
    device: str
    ceilings: dict[str, float]  # copy GB/s (read + written) and matmul TFLOP/s, measured here
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eager_us(fn: Callable[[], Any], calls: int, reps: int, device: torch.device) -> float:
    """Median over ``reps`` loops of the wall-clock microseconds per call of ``calls`` calls."""
    fn()
    _sync(device)
    loops = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        loops.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(loops)


def _graph_us(fn: Callable[[], Any], graph_ms: int, device: torch.device) -> float | None:
    """Median microseconds per call under CUDA-graph replay; None off CUDA."""
    if device.type != "cuda":
        return None
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=graph_ms, return_mode="median")


def _forced_scheme_us(scheme: str, x, a, b, ref, rtol: float, graph_ms: int) -> float | None:
    """Graph time of the fused kernel with ``scheme`` forced; None when it fails the check."""
    from fasttrunc.kernels import lowrank as lk

    saved = lk.FORCE_SCHEME
    lk.FORCE_SCHEME = scheme
    try:
        got = lk.lowrank_linear(x, a, b).float()
        if not (got - ref).norm().item() / ref.norm().item() < rtol:
            return None
        return _graph_us(lambda: lk.lowrank_linear(x, a, b), graph_ms, x.device)
    finally:
        lk.FORCE_SCHEME = saved


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


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [row for row in rows if row["correct"]]
    graph = [row["speedup_graph"] for row in timed if row["speedup_graph"] is not None]
    eager = [row["speedup_eager"] for row in timed]
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


def run(config: LowrankBenchConfig, progress: Progress = None) -> LowrankBenchResult:
    """Check and time every cell of the grid; see the module docstring.

    Meant for CUDA; ``device="cpu"`` runs only under ``TRITON_INTERPRET=1`` (graph times and
    ceilings are then absent), to test the benchmark itself with tiny grids.
    """
    import torch.nn.functional as F

    from fasttrunc.kernels import lowrank as lk
    from fasttrunc.kernels._backend import use_triton
    from fasttrunc.runs import resolve_device

    config.validate()
    device = resolve_device(config.device)
    if not use_triton(torch.empty(0, device=device)):
        raise ValueError(
            f"device {config.device!r} cannot run the Triton kernels; the low-rank benchmark needs a CUDA device"
        )
    dtype = _DTYPES[config.dtype]
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    cells = [(k, n, r, m) for k, n in config.shapes for r in config.ranks for m in config.ms]
    report(progress, "bench lowrank", 0, len(cells) + 1, "ceilings")
    ceilings = _ceilings(dtype, device)
    labels = {shape: label for label, shape in PYTHIA_SHAPES.items()}
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for i, (k, n, r, m) in enumerate(cells):
            report(progress, "bench lowrank", i + 1, len(cells) + 1, f"{k}->{n} r={r} M={m}")
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
            a = (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(device=device, dtype=dtype)
            b = (torch.randn(n, r, generator=gen) / math.sqrt(r)).to(device=device, dtype=dtype)
            w = (b.float() @ a.float()).to(dtype)
            at, bt = a.T, b.T
            ref = lk.lowrank_linear_reference(x, a, b).float()
            got = lk.lowrank_linear(x, a, b).float()
            rel_err = ((got - ref).norm() / ref.norm()).item()
            plan = lk.plan_lowrank(m, k, n, r, dtype, device)
            row: dict[str, Any] = {
                "shape": labels.get((k, n), f"{k}->{n}"),
                "in": k,
                "out": n,
                "r": r,
                "m": m,
                "scheme": plan.scheme,
                "grid": plan.grid,
                "rel_err": rel_err,
                "correct": math.isfinite(rel_err) and rel_err < _RTOL[config.dtype],
            }
            variants = {
                "dense": lambda: F.linear(x, w),
                "two_gemms": lambda: (x @ at) @ bt,
                "fused": lambda: lk.lowrank_linear(x, a, b),
            }
            for name, fn in variants.items():
                if not row["correct"]:
                    row[f"{name}_eager_us"] = row[f"{name}_graph_us"] = None
                    continue
                row[f"{name}_eager_us"] = _eager_us(fn, config.calls, config.reps, device)
                row[f"{name}_graph_us"] = _graph_us(fn, config.graph_ms, device)
            for scheme in ("splitk", "tiled") if config.compare_schemes else ():
                row[f"{scheme}_graph_us"] = _forced_scheme_us(
                    scheme, x, a, b, ref, _RTOL[config.dtype], config.graph_ms
                )
            floor = _floor_us(m, k, n, r, x.element_size(), ceilings)
            row["floor_us"] = floor if math.isfinite(floor) else None
            fused_graph, fused_eager = row["fused_graph_us"], row["fused_eager_us"]
            row["speedup_graph"] = row["two_gemms_graph_us"] / fused_graph if fused_graph else None
            row["speedup_eager"] = row["two_gemms_eager_us"] / fused_eager if fused_eager else None
            row["floor_pct"] = 100 * row["floor_us"] / fused_graph if fused_graph and row["floor_us"] else None
            rows.append(row)
            del x, a, b, w, ref, got
    report(progress, "bench lowrank", len(cells) + 1, len(cells) + 1, "done")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return LowrankBenchResult(config, name, ceilings, rows, _summary(rows))


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
        "fused eager",
        "eager x",
        "dense graph",
        "2-GEMM graph",
        "fused graph",
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
