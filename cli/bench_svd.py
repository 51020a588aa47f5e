"""``fasttrunc bench svd``: the batched randomized SVD against torch (fasttrunc.bench.svd), CUDA only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fasttrunc.cli._common import check_out, emit, fail, int_option, make_table, progress_bar, user_errors
from fasttrunc.cli.apps import bench_app


def _tables(result: Any) -> list:
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}x"

    rows = [
        [
            row["set"],
            "-" if row["k"] is None else row["k"],
            row["method"],
            f"{1e3 * row['seconds']:.1f}",
            ratio(row["speedup_vs_svd_lowrank"]),
            ratio(row["speedup_vs_linalg_svd"]),
            f"{row['error_ratio']:.4f}",
        ]
        for row in result.rows
    ]
    main = make_table(
        f"Randomized SVD on {result.device}: median of {result.config.reps} runs; error = worst |W - U S Vh|_F / optimal",
        ["matrices", "k", "method", "ms", "vs svd_lowrank", "vs linalg.svd", "error"],
        rows,
    )
    stages = make_table(
        "Stages of one fasttrunc call (ms; the last row of each block is a sweep count)",
        ["batch", "k", "stage", "ms"],
        [[s["shape"], s["k"], s["stage"], f"{s['ms']:.2f}"] for s in result.stages],
    )
    return [main, stages]


HELP = (
    "Time fasttrunc's batched randomized SVD against torch on the MLP weight shapes of Pythia-1.4b "
    "and Pythia-12b, on a CUDA device.\n\n"
    "Each matrix has the singular values i^-0.5, so the optimal rank-k error is known and every "
    "method's worst error is reported as a multiple of it. The baselines, torch.svd_lowrank looped "
    "over the matrices, a plain-torch batched randomized SVD and torch.linalg.svd, are timed in "
    "the same run on the same card. The full run takes about two minutes on an H100."
)


@bench_app.command("svd", help=HELP)
@user_errors
def bench_svd(
    rank: list[int] = typer.Option([64, 256], "--rank", help="Rank k to keep; repeat the option for several ranks."),
    reps: int = int_option(3, "--reps", help="Timed runs per method after one warm-up; the median is reported."),
    quick: bool = typer.Option(
        False, "--quick", help="Use 8 matrices of Pythia-1.4b's MLP shapes instead of the full sets."
    ),
    no_full_svd: bool = typer.Option(
        False, "--no-full-svd", help="Skip timing torch.linalg.svd, which takes about ten seconds per set."
    ),
    no_bf16: bool = typer.Option(False, "--no-bf16", help="Skip the run on bf16-stored weights."),
    tiny: bool = typer.Option(
        False,
        "--tiny",
        help="Three small matrices on the CPU (needs TRITON_INTERPRET=1): checks the benchmark, not the speed.",
    ),
    seed: int = int_option(0, "--seed", help="Seed of the test matrices and of the sketches."),
    out: Path | None = typer.Option(None, "--out", help="Write results.json into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
) -> None:
    from fasttrunc.bench.svd import MATRIX_SETS, QUICK_SETS, TINY_SETS, SvdBenchConfig, run

    sets = TINY_SETS if tiny else QUICK_SETS if quick else MATRIX_SETS
    config = SvdBenchConfig(
        sets=tuple(sets),
        ranks=(1,) if tiny else tuple(rank),
        reps=1 if tiny else reps,
        bf16=not (no_bf16 or tiny),
        full_svd=not no_full_svd,
        seed=seed,
        device="cpu" if tiny else "cuda",
        # Tiny: l = k + 2 = 3 columns, so that the interpreter's Jacobi takes seconds, not minutes.
        oversample=2 if tiny else 10,
        defaults_variant=not tiny,
    )
    out = check_out(out)
    import torch

    if not tiny and not torch.cuda.is_available():
        fail("fasttrunc bench svd needs a CUDA device, and this machine has none")
    with progress_bar(not as_json) as progress:
        result = run(config, progress)
    emit(result, as_json=as_json, out=out, tables=_tables)
