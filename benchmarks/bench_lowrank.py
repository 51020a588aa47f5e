"""Fused low-rank linear vs torch on the Pythia MLP grid: correctness, then the ratio table.

    python benchmarks/bench_lowrank.py [--quick] [--json PATH]
    python benchmarks/bench_lowrank.py --tiny --json PATH   # CPU, Triton's interpreter: checks the script

Runs fasttrunc.bench.lowrank (the same grid as `fasttrunc bench lowrank`): every cell is checked
against the torch reference first, then dense F.linear, torch's two GEMMs and the fused kernel
are timed in the same run, eagerly and under CUDA-graph replay. Prints the environment, the
summary against the targets and a markdown table ready for benchmarks/RESULTS.md (last), and
writes every number as JSON. Exits 1 when a cell fails the correctness check.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Only r = 128 and M in {1, 4096}.")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32.")
    parser.add_argument(
        "--tiny", action="store_true", help="A 2-cell fp32 grid on the CPU (needs TRITON_INTERPRET=1): the dry run."
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="Where to write the JSON (default: benchmarks/lowrank-<UTC time>.json)."
    )
    args = parser.parse_args(argv)

    import dataclasses

    import torch

    from fasttrunc.bench.lowrank import LowrankBenchConfig, run, summary_lines, table_rows

    if args.tiny:
        config = LowrankBenchConfig(
            shapes=((33, 20),), ranks=(5,), ms=(1, 3), dtype="float32", reps=1, calls=2, graph_ms=5, device="cpu"
        )
    elif not torch.cuda.is_available():
        print("bench_lowrank.py needs a CUDA device, and this machine has none", file=sys.stderr)
        return 2
    else:
        config = LowrankBenchConfig(dtype=args.dtype)
    if args.quick:
        config = dataclasses.replace(config, ranks=(128,), ms=(1, 4096))

    def progress(stage: str, done: int, total: int, description: str) -> None:
        print(f"[{stage} {done}/{total}] {description}", file=sys.stderr, flush=True)

    result = run(config, progress)
    data = result.to_dict()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or Path(__file__).resolve().parent / f"lowrank-{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")

    env = data["environment"]
    print(f"date {stamp}; card {result.device}; torch {env['torch']}; triton {env['triton']}; python {env['python']}")
    flags = (" --tiny" if args.tiny else "") + (" --quick" if args.quick else "")
    print(f"command: python benchmarks/bench_lowrank.py{flags} --dtype {args.dtype}")
    for line in summary_lines(result):
        print(line)
    print(f"JSON: {path}\n")
    columns, rows = table_rows(result)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if result.summary["incorrect_cells"] else 0


if __name__ == "__main__":
    sys.exit(main())
