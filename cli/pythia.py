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
    given_on_command_line,
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
TASK_HELP = (
    "The tasks, comma-separated: at most one of ioi, factual, and any task files (.jsonl or .csv with prompt, "
    "answer, optional distractor and choices), scored with LASER's metrics."
)
N_HELP = "Number of prompts (default: 200 for ioi, every shipped fact for factual; a task file's first N, default all)."
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


ANSWER_ROWS = (
    ("accuracy", "accuracy"),
    ("top-5 accuracy (single-token answers)", "top5_accuracy"),
    ("top-10 accuracy (single-token answers)", "top10_accuracy"),
    ("mean log P(answer)", "mean_log_prob"),
    ("mean P(answer)", "mean_p_answer"),
    ("log-loss (per answer token)", "log_loss"),
    ("mean of ratios P(answer)/P(distractor)", "mean_of_ratios"),
    ("ratio of means P(answer)/P(distractor)", "ratio_of_means"),
)


def _pythia_tables(result: PythiaResult) -> list[Table]:
    cfg = result.config
    tables = []
    for rev in result.revisions:
        where = f"{cfg.model} {rev.revision or ''}"
        if rev.baseline is not None:
            rows = [
                [label, _fmt(getattr(rev.baseline, key)), _fmt(getattr(rev.truncated, key))]
                for label, key in METRIC_ROWS
            ]
            title = f"{where} {cfg.builtin_task}, {result.n_prompts} prompts: {cfg.edit_label()}"
            tables.append(make_table(title, ["metric", "baseline", "truncated"], rows))
        for task in rev.answers:
            rows = [
                [label, _fmt(getattr(task.baseline, key)), _fmt(getattr(task.truncated, key))]
                for label, key in ANSWER_ROWS
            ]
            title = f"{where} {task.task}, {task.n} examples: {cfg.edit_label()}"
            tables.append(make_table(title, ["metric", "baseline", "truncated"], rows))
    if len(result.revisions) > 1 and cfg.builtin_task is not None:
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
        f"{cfg.builtin_task} along training: baseline -> {cfg.edit_label()}",
        ["revision"]
        + [label for label, _ in ALONG_TRAINING]
        + ['P(correct)/P(" the") ratio of means', "mean of ratios"],
        rows,
    )


# run pythia's options as PythiaConfig fields: field -> the command's parameters that set it
CONFIG_FIELDS = {
    "model": ("model",),
    "layers": ("layer",),
    "matrices": ("matrix",),
    "rank": ("rank",),
    "task": ("task",),
    "edit": ("edit",),
    "edits": ("edits",),
    "revisions": ("revision", "revisions"),
    "n": ("n",),
    "seed": ("seed",),
    "device": ("device",),
    "dtype": ("dtype",),
    "batch_size": ("batch_size",),
    "method": ("method",),
}
EDIT_OPTIONS = ("layer", "matrix", "rank", "edit")  # what --edits replaces
EDIT_KIND_HELP = (
    "The edit: keep-top (LASER's: keep the top-k singular components), remove-top (remove them, keep the rest) "
    "or magnitude (keep the k*(in+out) largest-magnitude weights)."
)
EDITS_HELP = "Apply a saved composition (edits.json: module, rank, kind per edit) instead of --layer/--matrix/--rank."


def refuse_edits_with_targets(explicit: set[str], options: tuple[str, ...] = EDIT_OPTIONS) -> None:
    """--edits replaces the single-edit options: giving both is a one-line error."""
    clash = [name for name in options if name in explicit]
    if "edits" in explicit and clash:
        shown = ", ".join("--" + name for name in clash)
        fail(f"--edits replaces {shown}; give --edits FILE, or --layer and --rank, not both")


def pythia_options(ctx: typer.Context, values: dict[str, Any], config_file: Path | None) -> dict[str, Any]:
    """PythiaConfig's keyword options: ``--config``'s, overridden by what the command line gives explicitly.

    An option left at its default fills only what the file leaves unset. An explicit --edits drops
    the file's layers, matrices, rank and edit; an explicit --layer, --matrix, --rank or --edit
    drops the file's edits.
    """
    from fasttrunc.experiments.pythia import PythiaConfig
    from fasttrunc.records import load_run_config

    explicit = given_on_command_line(ctx)
    refuse_edits_with_targets(explicit)
    options = load_run_config(config_file, PythiaConfig) if config_file is not None else {}
    if "edits" in explicit:
        for key in ("layers", "matrices", "rank", "edit"):
            options.pop(key, None)
    if explicit & set(EDIT_OPTIONS):
        options.pop("edits", None)
    for key, params in CONFIG_FIELDS.items():
        if (explicit & set(params) or key not in options) and values[key] is not None:
            options[key] = values[key]
    if "layers" not in options and "edits" not in options:
        fail("give --layer and --rank (or --edits FILE, or --config FILE)")
    return options


@run_app.command("pythia")
@user_errors
def run_pythia(
    ctx: typer.Context,
    model: str = typer.Option("EleutherAI/pythia-1b", "--model", help=MODEL_HELP),  # the paper's model
    layer: str | None = typer.Option(
        None,
        "--layer",
        help="Layer indices to edit, comma-separated (10,11), ranges (8-15) or negative from the end.",
    ),
    matrix: str = typer.Option(
        "mlp_in",
        "--matrix",
        help="Matrices to edit, comma-separated: mlp_in, mlp_out, attn_qkv, attn_out, or the groups mlp, attn, all.",
    ),
    rank: str | None = typer.Option(
        None, "--rank", help="The rank: an int is absolute, a float in [0, 1] is the fraction of the full rank."
    ),
    edit: str = typer.Option("keep-top", "--edit", help=EDIT_KIND_HELP),
    edits: Path | None = typer.Option(None, "--edits", help=EDITS_HELP),
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
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="Read the options from a .toml file or a previous results.json; options given here override it.",
    ),
    save_predictions: Path | None = typer.Option(
        None, "--save-predictions", help="Write per-example predictions (baseline and edited) to a .jsonl or .csv."
    ),
    out: Path | None = OUT_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Compare a model's predictions (IOI, factual recall, your task files) before and after one edit."""
    from fasttrunc.experiments import pythia
    from fasttrunc.plots import pythia_plots
    from fasttrunc.ranks import parse_rank
    from fasttrunc.runs import check_records_path, write_records

    check_out(out)
    if save_predictions is not None:
        save_predictions = check_records_path(save_predictions)
    layers = None if layer is None else parse_layers(layer)
    if layer is not None and layers is None:
        fail("--layer all is not supported by run pythia; list the layers, for example 0-15")
    values = {
        "model": model,
        "layers": None if layers is None else tuple(layers),
        "matrices": tuple(split_list(matrix, "matrices")),
        "rank": None if rank is None else parse_rank(rank),
        "task": task,
        "edit": edit,
        "edits": None if edits is None else str(edits),
        "revisions": parse_revisions(revision, revisions),
        "n": n,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size,
        "method": method,
    }
    config = pythia.PythiaConfig(**pythia_options(ctx, values, config_file))
    check_models(config.model, pythia.resolve_revisions(config.model, tuple(config.revisions)))
    with progress_bar(not as_json) as progress:
        result = pythia.run(config, progress)
    if save_predictions is not None:
        write_records(save_predictions, pythia.prediction_rows(result))
        if not as_json:
            stderr.print(f"wrote {save_predictions}", highlight=False)
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
