"""Time a LASER sweep on a Pythia-1.4b-shaped model: fasttrunc against LASER's recipe (CUDA).

    python benchmarks/bench_sweep.py                # 24 layers x {mlp_in, mlp_out} x 9 rhos x 200 prompts, bf16
    python benchmarks/bench_sweep.py --layers 4     # a quick run on the first 4 layers' worth of model
    python benchmarks/bench_sweep.py --json         # JSON only
    python benchmarks/bench_sweep.py --out DIR      # also DIR/results.json

Both paths run in the same process on the same card (fasttrunc.bench.sweep); copy the table into
benchmarks/RESULTS.md with the card's name.
"""

from __future__ import annotations

from pathlib import Path

import typer


def main(
    layers: int = typer.Option(
        24, "--layers", help="Number of layers of the model, all of them swept (24 is Pythia-1.4b)."
    ),
    n_prompts: int = typer.Option(200, "--n-prompts", help="Prompts scored per cell."),
    batch_size: int = typer.Option(50, "--batch-size", help="Prompts per forward pass, the same for both paths."),
    method: str = typer.Option("exact", "--method", help="fasttrunc's SVD: exact or randomized."),
    device: str = typer.Option("cuda", "--device", help="The device to run on; timings mean something on CUDA only."),
    out: Path = typer.Option(None, "--out", help="Write results.json into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
) -> None:
    """Time fasttrunc's LASER sweep against LASER's per-cell recipe on a random Pythia-1.4b-shaped model."""
    from fasttrunc.bench.sweep import SweepBenchConfig, run, summary_rows
    from fasttrunc.cli._common import emit, make_table, progress_bar, user_errors

    config = SweepBenchConfig(
        num_layers=layers, n_prompts=n_prompts, batch_size=batch_size, method=method, device=device
    )

    def tables(result):
        title = (
            f"LASER sweep on {result.device}: {result.cells} cells x {config.n_prompts} prompts, {config.dtype}, "
            f"{config.num_layers} layers of Pythia-1.4b's shape; seconds; max |dP(correct)| between paths "
            f"{result.max_abs_diff_p_correct:.4f}"
        )
        return [make_table(title, ["path", "SVD", "evaluation", "total", "vs fasttrunc"], summary_rows(result))]

    @user_errors
    def go() -> None:
        with progress_bar(not as_json) as progress:
            result = run(config, progress)
        emit(result, as_json=as_json, out=out, tables=tables)

    go()


if __name__ == "__main__":
    typer.run(main)
