"""The cost-model estimate of the fused low-rank linear per cell of the 36-cell bf16 grid (no GPU).

    python benchmarks/estimate_lowrank.py

ESTIMATES, not measurements: fasttrunc.bench.lowrank.estimate_fused_us (H200 ceilings of
benchmarks/BASELINES.md plus named assumptions) for the plan the planner picks, beside the byte
floor and the torch two-GEMM times BASELINES.md measured where it has them (eager: section 1,
graph replay: section 1b).
"""

from __future__ import annotations

import math

import torch

from fasttrunc.bench.lowrank import DEFAULT_MS, DEFAULT_RANKS, PYTHIA_SHAPES, estimate_fused_us
from fasttrunc.kernels.lowrank_plan import DEFAULT_TUNABLES, plan_lowrank

# BASELINES.md section 1 (two GEMMs eager, us) and 1b (two GEMMs under graph replay, us), H200.
TWO_GEMMS_EAGER = {
    (2048, 8192, 32, 1): 11.9, (2048, 8192, 32, 16): 12.7, (2048, 8192, 32, 256): 14.0, (2048, 8192, 32, 4096): 36.7,
    (2048, 8192, 128, 1): 12.9, (2048, 8192, 128, 16): 13.2, (2048, 8192, 128, 256): 14.9, (2048, 8192, 128, 4096): 39.0,
    (2048, 8192, 512, 1): 15.2, (2048, 8192, 512, 4096): 75.4, (8192, 2048, 32, 1): 13.0, (8192, 2048, 128, 16): 21.6,
    (8192, 2048, 128, 256): 16.5, (8192, 2048, 128, 4096): 42.8, (8192, 2048, 512, 4096): 71.5,
    (5120, 20480, 32, 1): 13.2, (5120, 20480, 128, 16): 15.0, (5120, 20480, 128, 256): 18.5,
    (5120, 20480, 128, 4096): 84.5, (5120, 20480, 512, 4096): 186.2,
}  # fmt: skip
TWO_GEMMS_GRAPH = {
    (2048, 8192, 128, 1): 7.3, (2048, 8192, 128, 256): 9.0, (2048, 8192, 128, 4096): 36.2, (8192, 2048, 128, 1): 8.5,
    (8192, 2048, 128, 4096): 33.5, (5120, 20480, 128, 1): 9.3, (5120, 20480, 128, 4096): 81.0,
    (2048, 8192, 32, 1): 7.0, (2048, 8192, 32, 4096): 34.8,
}  # fmt: skip


def rows() -> list[list[str]]:
    out = []
    ratios = []
    for k, n in PYTHIA_SHAPES.values():
        for r in DEFAULT_RANKS:
            for m in DEFAULT_MS:
                plan = plan_lowrank(m, k, n, r, torch.bfloat16, 132, DEFAULT_TUNABLES)
                est = estimate_fused_us(plan, m, k, n, r, 2)
                floor = 1e6 * max(2 * (m * k + k * r + r * n + m * n) / 4.22e12, 2 * m * r * (k + n) / 686e12)
                graph = TWO_GEMMS_GRAPH.get((k, n, r, m))
                eager = TWO_GEMMS_EAGER.get((k, n, r, m))
                ratio = graph / est if graph and est else None
                if ratio:
                    ratios.append(ratio)
                out.append(
                    [
                        f"{k}->{n}",
                        str(r),
                        str(m),
                        plan.scheme,
                        " + ".join(str(g[0]) for g in plan.grids),
                        "-" if est is None else f"{est:.1f}",
                        f"{floor:.2f}",
                        "-" if est is None else f"{100 * floor / est:.0f}%",
                        "-" if graph is None else f"{graph:.1f}",
                        "-" if ratio is None else f"{ratio:.2f}x",
                        "-" if eager is None else f"{eager:.1f}",
                    ]
                )
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
    out.append(
        ["geomean over the cells with a measured graph baseline", "", "", "", "", "", "", "", "", f"{geo:.2f}x", ""]
    )
    return out


def main() -> None:
    columns = [
        "shape",
        "r",
        "M",
        "scheme",
        "CTAs per launch",
        "fused graph (est.)",
        "floor",
        "% floor (est.)",
        "2-GEMM graph (BASELINES 1b)",
        "est. speedup",
        "2-GEMM eager (BASELINES 1)",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows():
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
