"""Time a LASER sweep: fasttrunc against its floor, the per-cell recipe and LASER as shipped.

    python benchmarks/bench_sweep.py                 # CUDA, Pythia-1.4b's shape, bf16, 24 layers x 2 x 9 rhos
    python benchmarks/bench_sweep.py --device cpu --layers 6 --hidden 512 --intermediate 2048 --heads 8 \\
        --n-prompts 64 --json                        # the CPU shape (fp32)
    python benchmarks/bench_sweep.py ... --search screened --keep 5
    python benchmarks/bench_sweep.py ... --ranks 0.9,0.2,0.01 --no-baselines
    python benchmarks/bench_sweep.py --study trained:0   # screened vs exhaustive, 432 cells (fasttrunc.bench.screen)

Every path runs in the same process on the same device (fasttrunc.bench.sweep); copy the table
into benchmarks/RESULTS.md with the device's name.
"""

from __future__ import annotations

from pathlib import Path

import typer


def main(
    device: str = typer.Option("cuda", "--device", help="The device to run on: cuda, cuda:N or cpu."),
    layers: int = typer.Option(24, "--layers", help="Layers of the model, all of them swept (24 is Pythia-1.4b)."),
    hidden: int = typer.Option(2048, "--hidden", help="Hidden size (2048 is Pythia-1.4b)."),
    intermediate: int = typer.Option(8192, "--intermediate", help="MLP width (8192 is Pythia-1.4b)."),
    heads: int = typer.Option(16, "--heads", help="Attention heads (16 is Pythia-1.4b)."),
    n_prompts: int = typer.Option(200, "--n-prompts", help="Prompts scored per cell."),
    batch_size: int = typer.Option(
        50, "--batch-size", help="Prompts per forward pass, the same for every batched path."
    ),
    ranks: str = typer.Option("0.9,0.8,0.6,0.4,0.2,0.1,0.05,0.01,0.005", "--ranks", help="Rhos, comma-separated."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32, float16 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)."
    ),
    search: str = typer.Option("exhaustive", "--search", help="fasttrunc's search: exhaustive or screened."),
    keep: int | None = typer.Option(None, "--keep", help="Screened search: cells evaluated exactly."),
    baselines: bool = typer.Option(
        True, "--baselines/--no-baselines", help="Also time the recipe and LASER as shipped."
    ),
    method: str = typer.Option("exact", "--method", help="fasttrunc's SVD: exact or randomized."),
    out: Path = typer.Option(None, "--out", help="Write results.json into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
    study: str | None = typer.Option(
        None, "--study", help="Instead: screened vs exhaustive on a tiny GPT-NeoX, trained:SEED or random:SEED."
    ),
) -> None:
    """Time fasttrunc's LASER sweep against its floor and two baselines on a random GPT-NeoX."""
    if study is not None:
        import json
        import tempfile

        from fasttrunc.bench.screen import study as screen_study

        kind, _, seed = study.partition(":")
        where = Path(out) if out is not None else Path(tempfile.gettempdir()) / "fasttrunc-screen-study"
        print(json.dumps(screen_study(kind, int(seed or 0), where, keep)))
        return
    from fasttrunc.bench.sweep import SweepBenchConfig, run, summary_rows
    from fasttrunc.cli._common import emit, make_table, progress_bar, user_errors

    @user_errors
    def go() -> None:
        config = SweepBenchConfig(
            num_layers=layers,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_heads=heads,
            n_prompts=n_prompts,
            batch_size=batch_size,
            ranks=tuple(float(r) for r in ranks.split(",")),
            dtype=dtype or ("float32" if device == "cpu" else "bfloat16"),
            search=search,
            keep=keep,
            baselines=baselines,
            method=method,
            device=device,
        )

        def tables(result):
            title = (
                f"LASER sweep on {result.device}: {result.cells} cells ({result.cells_evaluated} evaluated) x "
                f"{config.n_prompts} prompts, {config.dtype}, {config.num_layers} layers, d {config.hidden_size}, "
                f"MLP {config.intermediate_size}; best cell {result.best_cell} (exhaustive: "
                f"{result.exhaustive_best_cell}); max |dP(correct)| vs recipe {result.max_abs_diff_p_correct_recipe}, "
                f"vs shipped {result.max_abs_diff_p_correct_shipped}"
            )
            return [make_table(title, ["path", "seconds", "ratio"], summary_rows(result))]

        with progress_bar(not as_json) as progress:
            result = run(config, progress)
        emit(result, as_json=as_json, out=out, tables=tables)

    go()


if __name__ == "__main__":
    typer.run(main)
