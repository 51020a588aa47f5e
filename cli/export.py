"""`fasttrunc export`: edit a model (one edit kind, or an edits.json), merge the weights, save a plain checkpoint.

The directory written holds what ``save_pretrained`` writes plus the tokenizer, so
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it with no fasttrunc installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from fasttrunc import checks
from fasttrunc.cli._common import fail, given_on_command_line, stderr, user_errors
from fasttrunc.cli.apps import app
from fasttrunc.cli.pythia import (
    DEVICE_OPT,
    DTYPE_OPT,
    EDIT_KIND_HELP,
    EDITS_HELP,
    METHOD_OPT,
    MODEL_HELP,
    REVISION_HELP,
    parse_layers,
    refuse_edits_with_targets,
    split_list,
)


def check_export_dir(out: Path, overwrite: bool) -> Path:
    """Refuse a non-empty ``out`` unless ``overwrite``; then make sure it is a writable directory."""
    from fasttrunc.runs import check_output_dir

    directory = out.expanduser()
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        fail(f"--out {directory} is not empty; pass --overwrite to write the checkpoint into it anyway")
    return check_output_dir(directory)


@app.command("export")
@user_errors
def export(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    layer: str | None = typer.Option(
        None, "--layer", help="Layers to edit: comma-separated indices, ranges such as 8-15, negative from the end."
    ),
    matrix: str = typer.Option(
        "mlp_in", "--matrix", help="Matrices to edit, comma-separated aliases or groups (see fasttrunc targets)."
    ),
    rank: str | None = typer.Option(
        None, "--rank", help="The rank: an int is absolute, a float in [0, 1] is the fraction of the full rank."
    ),
    edit: str = typer.Option("keep-top", "--edit", help=EDIT_KIND_HELP),
    edits: Path | None = typer.Option(None, "--edits", help=EDITS_HELP),
    out: Path = typer.Option(..., "--out", help="The directory to write the plain checkpoint and its tokenizer to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a directory that is not empty."),
    revision: str | None = typer.Option(None, "--revision", help=REVISION_HELP),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    method: str = METHOD_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON on stdout and nothing else."),
) -> None:
    """Apply an edit (or an edits.json composition), merge it into plain dense weights, and save a model that needs no fasttrunc."""
    from fasttrunc.edits import EDIT_KINDS, apply_edits, edit_spec, load_edits, target_edits
    from fasttrunc.families import expand_matrices
    from fasttrunc.hub import load_model
    from fasttrunc.ranks import parse_rank, validate_rank_spec
    from fasttrunc.records import run_record
    from fasttrunc.runs import resolve_device
    from fasttrunc.svd import check_method
    from fasttrunc.truncation import Targets

    refuse_edits_with_targets(given_on_command_line(ctx))
    check_method(method)
    saved = None
    if edits is not None:
        saved = load_edits(edits)
    elif layer is None or rank is None:
        fail("give --layer and --rank, or --edits FILE")
    else:
        layers = parse_layers(layer)
        matrices = split_list(matrix, "matrices")
        expand_matrices(matrices)
        rank_value = parse_rank(rank)
        validate_rank_spec(rank_value)
        checks.choice("edit", edit, EDIT_KINDS)
    directory = check_export_dir(out, overwrite)
    lm, tokenizer = load_model(model, revision, dtype, resolve_device(device))
    chosen = (
        saved if saved is not None else target_edits(lm, Targets(layers=layers, matrices=matrices), rank_value, edit)
    )
    truncation = apply_edits(lm, chosen, method=method)
    modules = edit_spec(truncation, chosen, method)
    truncation.merge_()
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stdout and stderr stay as the command's own
    try:
        lm.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    summary = {
        "model": model,
        "revision": revision,
        "out": str(directory),
        "dtype": dtype,
        "edits": None if edits is None else str(edits),
        "modules": modules,
        "record": run_record(model, revision, tokenizer, svd_method=method),
    }
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    done = ", ".join(f"{name} {spec['kind']} rank {spec['rank']}" for name, spec in modules.items())
    stderr.print(f"merged {len(modules)} edited matrices ({done}); wrote {directory}", highlight=False)
