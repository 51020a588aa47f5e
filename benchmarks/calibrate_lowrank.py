"""Fit the low-rank planner's cost model to a benchmark run's measured times (CPU only, seconds).

    python benchmarks/calibrate_lowrank.py OUT/lowrank.json [--json PATH]

Reads the JSON `bench_lowrank.py --json` (or `benchmarks/gpu_check.sh`) wrote: every correct cell's
graph-replay times of torch's two GEMMs and of both Triton schemes forced. Fits the constants of
fasttrunc.kernels.lowrank_cost (least squares in log time), prints them as a LowrankCostModel
literal, the error of the current and the fitted model, and per cell the scheme each model would
choose with that scheme's measured time: what decides whether the fitted constants replace
DEFAULT_COST_MODEL. Exits 2 on a file that is not such a JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fmt(v: float | None, unit: str = "x") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="The benchmark's JSON (bench_lowrank.py --json PATH).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the calibration as JSON here.")
    args = parser.parse_args(argv)

    from fasttrunc.bench.lowrank import calibrate

    try:
        data = json.loads(args.result.read_text())
        out = calibrate(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"calibrate_lowrank.py: {args.result}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    fitted = ", ".join(f"{k}={v:.4g}" for k, v in out["fitted"].items())
    print(f"measured points: {out['points']}")
    print(f"fitted: LowrankCostModel({fitted})")
    for name in ("start", "fitted"):
        errors = ", ".join(f"{s} {e:.3f}" for s, e in out["rms_log_error"][name].items())
        print(f"RMS log error, {name} model: {errors}")
    geo = out["graph_geomean"]
    print(
        f"graph speedup over two GEMMs of the scheme each model picks: start {_fmt(geo['start'])}, fitted {_fmt(geo['fitted'])}"
    )
    print()
    print("| in -> out | r | M | 2-GEMM | split-K | tiled | best | start picks | fitted picks | fitted x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in out["cells"]:
        t = c["measured_us"]
        times = " | ".join(_fmt(t.get(s), "") for s in ("torch", "splitk", "tiled"))
        print(
            f"| {c['in']} -> {c['out']} | {c['r']} | {c['m']} | {times} | {c['best_measured']} | "
            f"{c['start_scheme']} | {c['fitted_scheme']} | {_fmt(c['fitted_speedup'])} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
