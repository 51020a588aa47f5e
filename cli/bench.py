"""``fasttrunc bench lowrank``: the fused low-rank linear against torch (fasttrunc.bench.lowrank), CUDA only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fasttrunc.cli._common import check_out, emit, fail, int_option, make_table, progress_bar, stderr, user_errors
from fasttrunc.cli.apps import bench_app


def _tables(result: Any) -> list:
    from fasttrunc.bench.lowrank import summary_lines, table_rows

    columns, rows = table_rows(result)
    title = "Fused low-rank linear vs torch; x = two GEMMs time / fused time; % floor = floor / fused graph\n"
    return [make_table(title + "\n".join(summary_lines(result)), columns, rows)]


HELP = (
    "Time fasttrunc's fused low-rank linear y = (x @ a.T) @ b.T against torch on a CUDA device.\n\n"
    "For every shape, rank and number of rows M, the kernel is first checked against the torch "
    "reference, then timed beside F.linear with the dense weight and torch's two GEMMs (x @ A) @ B, "
    "all in the same run: eagerly (back-to-back calls, what a generate() loop sees) and under "
    "CUDA-graph replay. The byte and FLOP floor uses the copy bandwidth and matmul peak measured "
    "in the same run. The default grid is the MLP shapes of Pythia-1.4b and Pythia-12b, ranks "
    "32, 128 and 512, and M of 1, 16, 256 and 4096; it takes a few minutes on an H100."
)


@bench_app.command("lowrank", help=HELP)
@user_errors
def bench_lowrank(
    shapes: str = typer.Option(
        "2048x8192,8192x2048,5120x20480",
        "--shapes",
        help="Weight shapes to time, as comma-separated INxOUT pairs.",
    ),
    ranks: str = typer.Option("32,128,512", "--ranks", help="Ranks to time, comma-separated (1 to 1024)."),
    rows: str = typer.Option("1,16,256,4096", "--rows", help="Numbers of input rows M to time, comma-separated."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Data type of every operand: bfloat16, float16 or float32."),
    reps: int = int_option(5, "--reps", help="Timed eager loops per variant; the median is reported."),
    seed: int = int_option(0, "--seed", help="Seed of the random inputs."),
    out: Path | None = typer.Option(None, "--out", help="Write results.json into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
) -> None:
    from fasttrunc.bench.lowrank import LowrankBenchConfig, parse_ints, parse_shapes, run

    config = LowrankBenchConfig(
        shapes=parse_shapes(shapes),
        ranks=parse_ints("ranks", ranks),
        ms=parse_ints("rows", rows),
        dtype=dtype,
        reps=reps,
        seed=seed,
    )
    out = check_out(out)
    import torch

    if not torch.cuda.is_available():
        fail("fasttrunc bench lowrank needs a CUDA device, and this machine has none")
    with progress_bar(not as_json) as progress:
        result = run(config, progress)
    emit(result, as_json=as_json, out=out, tables=_tables)
    if not as_json and result.summary["incorrect_cells"]:
        stderr.print(f"{result.summary['incorrect_cells']} cells failed the correctness check", highlight=False)
