"""`fasttrunc targets`: see which modules a layer and matrix selection names, from the config alone.

The model is built on the meta device from its ``config.json`` (no weights are read or
allocated), so a 70B model is described as quickly as a tiny one.
"""

from __future__ import annotations

import json
import sys

import typer

from fasttrunc.cli._common import stdout, user_errors
from fasttrunc.cli.apps import app
from fasttrunc.cli.pythia import parse_layers, split_list

TARGETS_MODEL_HELP = "A Hugging Face hub id (meta-llama/Llama-3.2-1B) or a local model directory."
TARGETS_LAYER_HELP = "Layers to show: comma-separated indices, ranges such as 8-15, negative from the end, or all."
TARGETS_MATRIX_HELP = (
    "Matrices to show, comma-separated: mlp_in, mlp_up, mlp_out, attn_q, attn_k, attn_v, attn_qkv, attn_out, "
    "or the groups mlp, attn, all."
)


@app.command("targets")
@user_errors
def targets(
    model: str = typer.Option(..., "--model", help=TARGETS_MODEL_HELP),
    layer: str = typer.Option("all", "--layer", help=TARGETS_LAYER_HELP),
    matrix: str = typer.Option("all", "--matrix", help=TARGETS_MATRIX_HELP),
    revision: str | None = typer.Option(None, "--revision", help="The revision whose config to read."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout and nothing else."),
) -> None:
    """Show the model family found, its layers and, per layer, alias -> module names and shapes (no weights loaded)."""
    from fasttrunc.describe import describe_targets

    layers = parse_layers(layer)
    matrices = split_list(matrix, "matrices")
    from fasttrunc.hub import load_config

    config = load_config(model, revision)
    description = describe_targets(config, layers=layers, matrices=matrices)
    if as_json:
        sys.stdout.write(json.dumps({"model": model, **description.to_dict()}, indent=2) + "\n")
        return
    stdout.print(description.format(), highlight=False, markup=False, soft_wrap=True)
