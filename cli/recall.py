"""``fasttrunc run recall``: the noisy in-context recall experiment (fasttrunc.experiments.recall)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from fasttrunc.cli._common import check_out, emit, int_option, make_table, progress_bar, user_errors
from fasttrunc.cli.apps import run_app

if TYPE_CHECKING:
    from rich.table import Table

    from fasttrunc.experiments.recall import RecallResult


def _tables(result: RecallResult) -> list[Table]:
    from fasttrunc.experiments.recall import Tracked

    full, effect, config = result.full, result.effect, result.config

    def row(name: str, rho: str, rank: Any, m: Any) -> list[Any]:
        return [name, rho, rank, m.accuracy, m.p_answer, m.p_noise, m.ff2_probe_embedding, m.ff2_probe_residual]

    rows = [row("full model", "-", "-", full)] + [row(c.matrix, f"{c.rho:g}", c.rank, c.metrics) for c in result.cells]
    grid = make_table(
        f"Noisy in-context recall ({config.data} data, {config.init} unembedding): "
        f"{result.n_eval_positions} clean trigger positions",
        [
            "truncated",
            "rho",
            "rank",
            "accuracy",
            "P(ybar)",
            "P(noise)",
            "FF2 probe (embedding)",
            "FF2 probe (residual)",
        ],
        rows,
    )
    grid.caption = (
        "FF2 probe: the noise logit minus the largest other when FF2 alone reads the trigger's token embedding "
        "(the paper's probe) or the residual stream entering FF2. "
        f"alpha {config.alpha:g}, {config.steps} steps, {result.seconds:.0f} s. Removing FF2: "
        f"P(noise) {effect.p_noise_full:.3f} -> {effect.p_noise_without_ff2:.3f}, accuracy "
        f"{effect.accuracy_full:.3f} -> {effect.accuracy_without_ff2:.3f}: effect "
        + ("shown." if effect.shown else "NOT shown.")
    )
    tables = [grid]
    dynamics = result.dynamics
    if dynamics is not None:
        short = Tracked(
            accuracy_full="acc",
            accuracy_no_ff2="acc-FF2",
            p_noise_full="Pnoise",
            p_noise_no_ff2="Pnoise-FF2",
            ff2_noise_share="FF2 share",
            ff2_probe_embedding="probe(emb)",
            ff2_probe_residual="probe(res)",
            attention_mass="attn",
        )
        names = [f.name for f in dataclasses.fields(short)]
        series, appears = dynamics.series, dynamics.appears
        when = [getattr(appears, n) for n in names]
        curves = make_table(
            "Training dynamics on clean data",
            ["step"] + [getattr(short, n) for n in names],
            [[step] + [getattr(series, n)[i] for n in names] for i, step in enumerate(dynamics.steps)]
            + [["t_half"] + ["-" if w is None else str(w) for w in when]],
        )
        answer = {True: "yes", False: "no", None: "undecided"}[dynamics.ff2_noise_before_in_context]
        curves.caption = (
            "-FF2: FF2 removed; FF2 share: P(noise) minus P(noise) without FF2; attn: layer-2 attention from "
            "the trigger onto positions after earlier triggers; t_half: first step a curve has risen half "
            f"way to its final value. FF2's noise association before the in-context mechanism: {answer}."
        )
        tables.append(curves)
    return tables


def _plots(result: RecallResult, out: Path) -> list[Path]:
    from fasttrunc import plots

    paths = [plots.plot_recall_truncation(result, out / "recall_truncation.png")]
    if result.dynamics is not None:
        paths.append(plots.plot_recall_dynamics(result, out / "recall_dynamics.png"))
    return paths


HELP = (
    "Train the two-layer toy transformer on noisy in-context recall, then measure how truncating "
    "each feed-forward matrix changes its predictions.\n\n"
    "After each trigger token the training data holds the sequence's answer with probability "
    "1 - alpha and a fixed noise token with probability alpha. The trained model is evaluated on "
    "clean sequences at trigger positions: as it is, with W1 or W2 of either feed-forward layer, "
    "the second block's attention Wv or Wo, or their product Wo Wv cut to rank int(rho * d) for rho "
    "in 0, 0.1, 0.2, 0.5 and 1. The quick preset (synthetic data, N(0, 1/d) unembedding) runs in "
    "under a minute on a CPU; paper-small is the paper's data and init at CPU sizes; paper is the "
    "paper's size and wants a GPU."
)


@run_app.command("recall", help=HELP)
@user_errors
def recall(
    preset: str = typer.Option(
        "quick",
        "--preset",
        help="Data, init, sizes and schedule to start from: quick (CPU, default), paper-small (the paper's data and init, CPU sizes) or paper (GPU).",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="The Markov chain: shakespeare (the paper's tiny-Shakespeare character statistics) or synthetic (the CPU-friendly stand-in); the preset's by default.",
    ),
    init: str | None = typer.Option(
        None,
        "--init",
        help="The frozen unembedding's init: paper (nn.Linear's default, U(+-1/sqrt(d))) or normal (N(0, 1/d)); the preset's by default.",
    ),
    alpha: float | None = typer.Option(
        None,
        "--alpha",
        help="Probability of the noise token after a trigger in training data, in [0, 1]; the preset's 0.5 by default.",
    ),
    steps: int | None = int_option(None, "--steps", help="Number of SGD steps; the preset's value by default."),
    seed: int = int_option(0, "--seed", help="Seed of the data, the model and the training order."),
    device: str = typer.Option("cpu", "--device", help="Device to train on, such as cpu or cuda:0."),
    track_every: int | None = typer.Option(
        None,
        "--track-every",
        help="Measure the training dynamics on clean data every K steps, K from 1 to the number of steps, and report them.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Write results.json and the PNG plots into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
) -> None:
    from fasttrunc.experiments.recall import RecallConfig, run

    config = RecallConfig.from_preset(
        preset, data=data, init=init, alpha=alpha, steps=steps, seed=seed, device=device, track_every=track_every
    )
    out = check_out(out)
    with progress_bar(not as_json) as progress:
        result = run(config, progress)
    emit(result, as_json=as_json, out=out, tables=_tables, plots=_plots)
