"""`fasttrunc run pythia` and `fasttrunc make-tiny-neox` (`fasttrunc sweep pythia` lives in cli/sweep.py).

Thin: options -> config, progress on stderr, tables / JSON / --out. The library is imported
inside the command bodies so that `fasttrunc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from fasttrunc.cli._common import (
    check_models,
    check_out,
    emit,
    fail,
    int_option,
    make_table,
    progress_bar,
    stderr,
    user_errors,
)
from fasttrunc.cli.apps import app, run_app

if TYPE_CHECKING:
    from rich.table import Table

    from fasttrunc.experiments.pythia import PythiaResult

MODEL_HELP = "A Hugging Face hub id (EleutherAI/pythia-1b) or a local model directory."
REVISION_HELP = "One revision to load, for example step14000 (a local directory looks in DIR/revisions/)."
REVISIONS_HELP = "Comma-separated revisions to measure along training, for example step1000,step4000."
TASK_HELP = "The task: ioi or factual."
N_HELP = "Number of prompts (default: 200 for ioi, every shipped fact for factual)."
DEVICE_HELP = "The device to run on: cpu, cuda or cuda:N."
DTYPE_HELP = "The dtype to load the model in: float32, float16 or bfloat16."
BATCH_HELP = "Prompts per forward pass."
METHOD_HELP = "How the truncated SVD is computed: exact or randomized."
OUT_HELP = "Write results.json and the plots to this directory."
JSON_HELP = "Print the result as JSON on stdout and nothing else."
SEED_HELP = "Seed of the prompt sampler."

# Options both Pythia commands take (Typer reads these as plain defaults).
MODEL_OPT = typer.Option(..., "--model", help=MODEL_HELP)
REVISION_OPT = typer.Option(None, "--revision", help=REVISION_HELP)
REVISIONS_OPT = typer.Option(None, "--revisions", help=REVISIONS_HELP)
N_OPT = int_option(None, "--n", help=N_HELP)
SEED_OPT = int_option(0, "--seed", help=SEED_HELP)
DEVICE_OPT = typer.Option("cpu", "--device", help=DEVICE_HELP)
DTYPE_OPT = typer.Option("float32", "--dtype", help=DTYPE_HELP)
BATCH_OPT = int_option(32, "--batch-size", help=BATCH_HELP)
METHOD_OPT = typer.Option("exact", "--method", help=METHOD_HELP)
OUT_OPT = typer.Option(None, "--out", help=OUT_HELP)
JSON_OPT = typer.Option(False, "--json", help=JSON_HELP)


def split_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(f"{what} {text!r} must be a comma-separated list with no empty items")
    return items


def parse_layers(text: str) -> list[int] | None:
    """``"10,11"``, ``"8-15"``, ``"-2,-1"`` or ``"all"`` (None) as layer indices."""
    if text.strip() == "all":
        return None
    layers: list[int] = []
    for item in split_list(text, "layers"):
        try:
            if "-" in item[1:]:
                cut = item.index("-", 1)
                lo, hi = int(item[:cut]), int(item[cut + 1 :])
                if hi < lo:
                    raise ValueError
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(item))
        except ValueError:
            raise ValueError(
                f"layer {item!r} is not a layer index or a range like 8-15; give integers, for example 10,11 or 8-15"
            ) from None
    return layers


def parse_revisions(revision: str | None, revisions: str | None) -> tuple[str | None, ...]:
    if revision is not None and revisions is not None:
        raise ValueError("give --revision or --revisions, not both")
    if revisions is not None:
        return tuple(split_list(revisions, "revisions"))
    return (revision,)


def _fmt(value: object) -> object:
    return "-" if value is None else value


METRIC_ROWS = (
    ("P(correct)", "mean_p_correct"),
    ('P(" the")', "mean_p_the"),
    ("P(subject)", "mean_p_subject"),
    ('mean of ratios P(correct)/P(" the")', "mean_of_ratios"),
    ('ratio of means P(correct)/P(" the")', "ratio_of_means"),
    ("top-1 accuracy", "accuracy"),
    ("logit(IO) > logit(S)", "logit_diff_accuracy"),
)


def _pythia_tables(result: PythiaResult) -> list[Table]:
    cfg = result.config
    tables = []
    for rev in result.revisions:
        title = (
            f"{cfg.model} {rev.revision or ''} {cfg.task}, {result.n_prompts} prompts: layers {list(cfg.layers)} "
            f"{','.join(cfg.matrices)} rank {cfg.rank}"
        )
        rows = [
            [label, _fmt(getattr(rev.baseline, key)), _fmt(getattr(rev.truncated, key))] for label, key in METRIC_ROWS
        ]
        tables.append(make_table(title, ["metric", "baseline", "truncated"], rows))
    if len(result.revisions) > 1:
        tables.append(_along_training_table(result))
    return tables


ALONG_TRAINING = (('P(" the")', "mean_p_the"), ("P(correct)", "mean_p_correct"), ("IO>S", "logit_diff_accuracy"))


def _along_training_table(result: PythiaResult) -> Table:
    """One row per revision: each metric before -> after the truncation, and the ratio of means."""

    def pair(rev: Any, key: str) -> str:
        before, after = getattr(rev.baseline, key), getattr(rev.truncated, key)
        return "-" if before is None else f"{before:.3f} -> {after:.3f}"

    rows = [
        [rev.revision or "default"]
        + [pair(rev, key) for _, key in ALONG_TRAINING]
        + [pair(rev, "ratio_of_means"), pair(rev, "mean_of_ratios")]
        for rev in result.revisions
    ]
    cfg = result.config
    return make_table(
        f"{cfg.task} along training: baseline -> layers {list(cfg.layers)} {','.join(cfg.matrices)} rank {cfg.rank}",
        ["revision"]
        + [label for label, _ in ALONG_TRAINING]
        + ['P(correct)/P(" the") ratio of means', "mean of ratios"],
        rows,
    )


@run_app.command("pythia")
@user_errors
def run_pythia(
    model: str = typer.Option("EleutherAI/pythia-1b", "--model", help=MODEL_HELP),  # the paper's model
    layer: str = typer.Option(
        ...,
        "--layer",
        help="Layer indices to truncate, comma-separated (10,11), ranges (8-15) or negative from the end.",
    ),
    matrix: str = typer.Option(
        "mlp_in",
        "--matrix",
        help="Matrices to truncate, comma-separated: mlp_in, mlp_out, attn_qkv, attn_out, or the groups mlp, attn, all.",
    ),
    rank: str = typer.Option(
        ..., "--rank", help="The rank kept: an int is absolute, a float in [0, 1] is the fraction of the full rank."
    ),
    task: str = typer.Option("ioi", "--task", help=TASK_HELP),
    revision: str | None = REVISION_OPT,
    revisions: str | None = typer.Option(
        None,
        "--revisions",
        help=REVISIONS_HELP + " all: every checkpoint under a local directory's revisions/, in training order.",
    ),
    n: int | None = N_OPT,
    seed: int = SEED_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    batch_size: int = BATCH_OPT,
    method: str = METHOD_OPT,
    out: Path | None = OUT_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Compare a model's IOI or factual-recall predictions before and after truncating chosen matrices."""
    from fasttrunc.experiments import pythia
    from fasttrunc.plots import pythia_plots
    from fasttrunc.ranks import parse_rank

    check_out(out)
    layers = parse_layers(layer)
    if layers is None:
        fail("--layer all is not supported by run pythia; list the layers, for example 0-15")
    config = pythia.PythiaConfig(
        model=model,
        layers=tuple(layers),
        matrices=tuple(split_list(matrix, "matrices")),
        rank=parse_rank(rank),
        task=task,
        revisions=parse_revisions(revision, revisions),
        n=n,
        seed=seed,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        method=method,
    )
    check_models(config.model, pythia.resolve_revisions(config.model, tuple(config.revisions)))
    with progress_bar(not as_json) as progress:
        result = pythia.run(config, progress)
    emit(result, as_json=as_json, out=out, tables=_pythia_tables, plots=pythia_plots)


@app.command("make-tiny-neox")
@user_errors
def make_tiny_neox(
    directory: Path = typer.Argument(..., help="Where to save the model, its tokenizer and its checkpoints."),
    steps: int | None = int_option(None, "--steps", help="Training steps; the recipe's default is 5000."),
    seed: int = int_option(0, "--seed", help="Seed of the initialization and of the corpus."),
    checkpoints: str | None = typer.Option(
        None,
        "--checkpoints",
        help="Steps to save as revisions (DIR/revisions/stepN): comma-separated, for example 300,600,900, or log:K for K log-spaced steps from 1 to the last.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model already saved in the directory."),
) -> None:
    """Train a tiny GPT-NeoX (Pythia architecture) with a word-level tokenizer on a synthetic corpus, offline.

    The corpus mixes ordinary sentences, where "to" is followed by "the", sentences where "to" comes
    before a verb, IOI sentences whose answer is an earlier name, and the shipped facts. The model
    and tokenizer are saved as a Hugging Face directory that run pythia and sweep pythia accept as
    --model. Training (5000 steps) takes about two and a half minutes on an idle 2-core CPU and much
    longer on a busy one.
    """
    from fasttrunc.models.tiny_neox import TinyNeoxConfig, checkpoint_steps
    from fasttrunc.models.tiny_neox import make_tiny_neox as build

    if (directory / "config.json").exists() and not overwrite:
        fail(f"{directory} already holds a model; pass --overwrite to replace it")
    options: dict[str, Any] = {"seed": seed}
    if steps is not None:
        options["steps"] = steps
    if checkpoints is not None:
        options["checkpoints"] = checkpoint_steps(checkpoints, options.get("steps", TinyNeoxConfig.steps))
    config = TinyNeoxConfig(**options)
    check_out(directory, "DIR")
    with progress_bar(True) as progress:
        report = build(directory, config, progress)
    stderr.print(
        f"trained {report.steps} steps in {report.seconds:.0f} s (final loss {report.final_loss:.3f}); saved to {report.directory}",
        highlight=False,
    )
