"""``fasttrunc run memory``: the associative-memory experiment (fasttrunc.experiments.memory)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from fasttrunc.cli._common import check_out, emit, int_option, make_table, progress_bar, user_errors
from fasttrunc.cli.apps import run_app

if TYPE_CHECKING:
    from rich.table import Table

    from fasttrunc.experiments.memory import MemoryResult


def _tables(result: MemoryResult) -> list[Table]:
    s = result.summary
    cfg = result.config
    unit = "step" if cfg.full_batch else "samples"
    # (what, at which step, after how many training pairs): the table shows the run's own unit.
    events = [
        ("top component first holds >= half the noise", s.step_noise_on_top_first, s.samples_noise_on_top_first),
        ("... and for good", s.step_noise_on_top, s.samples_noise_on_top),
        ("half the clean associations stored", s.step_association_half, s.samples_association_half),
        ("90% of the clean associations stored", s.step_association_90, s.samples_association_90),
        ("P(noise) at half its final value", s.step_p_noise_half, s.samples_p_noise_half),
        ("P(f(x)) at half its final value", s.step_p_clean_half, s.samples_p_clean_half),
    ]

    def when(step: int | None, samples: int | None) -> str:
        value = step if cfg.full_batch else samples
        return "never" if value is None else str(value)

    learned = make_table(
        f"Associative memory: d={cfg.d}, N={cfg.n_tokens}, alpha={cfg.alpha}, shared={cfg.shared}, "
        f"{'full-batch GD' if cfg.full_batch else f'SGD batch {cfg.batch_size}'}, lr={cfg.lr}, {cfg.steps} steps",
        ["what", "value"],
        [
            ["component holding the noise at the end", s.noise_component],
            ["its share of the mean noise margin", s.noise_share_final],
            ["its alignment with (u_noise - mean u) mu^T", s.noise_alignment_final],
            ["sigma_1 / sigma_2 at the end", s.singular_gap_final],
            *[[f"{unit}: {what}", when(step, samples)] for what, step, samples in events],
            ["truncation that best restores clean predictions", s.restoring_truncation or "none"],
        ],
    )
    rows: list[list[Any]] = [
        [name, m.accuracy, m.p_noise, m.p_clean, m.association_accuracy] for name, m in s.final.items()
    ]
    truncations = make_table(
        f"Clean-data predictions after step {result.steps[-1]}: W, W without its top-k components, top-k alone",
        ["weights", "accuracy", "P(noise)", "P(f(x))", "association acc."],
        rows,
    )
    return [learned, truncations]


HELP = (
    "Train a linear associative memory on a noisy map and show where W stores the noise.\n\n"
    "The memory learns x -> f(x) from pairs whose output is a noise token with probability alpha. "
    "Every --record-every steps it records the singular values of W, how much of the noise association "
    "each top singular component carries, and the clean accuracy and P(noise) of W, of W without its "
    "top-k components and of its top-k components alone."
)


@run_app.command("memory", help=HELP)
@user_errors
def memory(
    d: int = typer.Option(128, "--d", help="Embedding dimension; W is d x d."),
    n_tokens: int = typer.Option(
        64, "--n-tokens", help="Number of input tokens N (the clean outputs are N more, plus one noise token)."
    ),
    alpha: float = typer.Option(
        0.3, "--alpha", help="Probability that a training pair's output is the noise token, in (0, 1)."
    ),
    shared: float = typer.Option(
        0.0,
        "--shared",
        help="Weight in [0, 1) of a direction common to all input embeddings; 0 keeps them near-orthogonal.",
    ),
    lr: float = typer.Option(1.0, "--lr", help="Learning rate of plain SGD (or of full-batch gradient descent)."),
    steps: int = int_option(2000, "--steps", help="Number of optimizer steps."),
    batch_size: int = int_option(4, "--batch-size", help="Training pairs per SGD step; ignored with --full-batch."),
    full_batch: bool = typer.Option(
        False, "--full-batch", help="Use gradient descent on the exact expected loss instead of SGD on sampled pairs."
    ),
    record_every: int = typer.Option(
        10, "--record-every", help="Record W's singular structure and predictions every this many steps."
    ),
    seed: int = int_option(0, "--seed", help="Seed of the embeddings, the clean map and the sampled pairs."),
    device: str = typer.Option("cpu", "--device", help="Torch device to train on, such as cpu or cuda."),
    out: Path | None = typer.Option(None, "--out", help="Write results.json and the PNG plots into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
) -> None:
    from fasttrunc.experiments.memory import MemoryConfig, run
    from fasttrunc.plots import plot_memory

    config = MemoryConfig(
        d=d,
        n_tokens=n_tokens,
        alpha=alpha,
        shared=shared,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        full_batch=full_batch,
        record_every=record_every,
        seed=seed,
        device=device,
    )
    out = check_out(out)
    with progress_bar(enabled=not as_json) as progress:
        result = run(config, progress)
    emit(result, as_json=as_json, out=out, tables=_tables, plots=plot_memory)
