"""The cost-model estimate of the fused low-rank linear per cell of the 36-cell bf16 grid (no GPU).

    python benchmarks/estimate_lowrank.py

ESTIMATES, not measurements: fasttrunc.kernels.lowrank_cost (H200 ceilings of
benchmarks/BASELINES.md, the two-GEMM constants fitted to its times, the fused kernels' constants
assumed) for each scheme, the scheme the cost planner and the rules pick, beside the byte floor
and the torch two-GEMM graph times BASELINES.md measured where it has them (section 1b).
"""

from __future__ import annotations

import math

import torch

from fasttrunc.bench.lowrank import DEFAULT_MS, DEFAULT_RANKS, H200_TWO_GEMMS_GRAPH_US, PYTHIA_SHAPES
from fasttrunc.kernels.lowrank_plan import DEFAULT_TUNABLES, plan_lowrank, scheme_estimates


def rows() -> list[list[str]]:
    """One row per cell: the cost model's estimates per scheme, the scheme each planner picks, and
    the chosen scheme's estimated speedup over two GEMMs (against BASELINES.md's measured graph
    time where it has one, else against the model's own two-GEMM estimate)."""
    out = []
    ratios, measured_ratios = [], []
    rules = DEFAULT_TUNABLES.rules_only()
    for k, n in PYTHIA_SHAPES.values():
        for r in DEFAULT_RANKS:
            for m in DEFAULT_MS:
                plan = plan_lowrank(m, k, n, r, torch.bfloat16, 132, DEFAULT_TUNABLES)
                ruled = plan_lowrank(m, k, n, r, torch.bfloat16, 132, rules)
                est = scheme_estimates(m, k, n, r, torch.bfloat16, 132, DEFAULT_TUNABLES)
                chosen = est[plan.scheme]
                floor = 1e6 * max(2 * (m * k + k * r + r * n + m * n) / 4.22e12, 2 * m * r * (k + n) / 686e12)
                graph = H200_TWO_GEMMS_GRAPH_US.get((k, n, r, m))
                ratio = est["torch"] / chosen
                ratios.append(ratio)
                # A torch cell runs the two GEMMs themselves: 1.0x by construction, not by the model.
                measured_ratio = (1.0 if plan.scheme == "torch" else graph / chosen) if graph else None
                if measured_ratio:
                    measured_ratios.append(measured_ratio)
                out.append(
                    [
                        f"{k}->{n}",
                        str(r),
                        str(m),
                        plan.scheme,
                        ruled.scheme,
                        f"{est['splitk']:.1f}",
                        f"{est['tiled']:.1f}",
                        f"{est['torch']:.1f}",
                        "-" if graph is None else f"{graph:.1f}",
                        f"{floor:.2f}",
                        f"{ratio:.2f}x",
                        "-" if measured_ratio is None else f"{measured_ratio:.2f}x",
                    ]
                )

    def geo(values: list[float]) -> str:
        return f"{math.exp(sum(map(math.log, values)) / len(values)):.2f}x" if values else "-"

    out.append(["geomean", "", "", "", "", "", "", "", "", "", geo(ratios), geo(measured_ratios)])
    return out


def main() -> None:
    columns = [
        "shape",
        "r",
        "M",
        "cost planner",
        "rules",
        "split-K (est.)",
        "tiled (est.)",
        "2-GEMM (est.)",
        "2-GEMM graph (BASELINES 1b)",
        "floor",
        "chosen vs 2-GEMM est.",
        "chosen est. vs 1b",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows():
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
