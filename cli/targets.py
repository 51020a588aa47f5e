"""`fasttrunc targets`: see which modules a layer and matrix selection names, from the config alone.

The model is built on the meta device from its ``config.json`` (no weights are read or
allocated), so a 70B model is described as quickly as a tiny one.
"""

from __future__ import annotations

import json
import sys
from typing import Any

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


def load_config(model: str, revision: str | None = None) -> Any:
    """The ``transformers`` config of a hub id or a local directory, without any weights.

    Resolved as :func:`fasttrunc.hub.load_model` resolves a model: a local directory (or one of
    its ``revisions/``), else the hub, asked once and then read from the local cache only when
    it does not answer. A config that cannot be fetched is the same one-line ValueError.
    """
    from fasttrunc.hub import _hub_problem, resolve_source

    where, hub_revision, is_local = resolve_source(model, revision)
    from transformers import AutoConfig

    problem = None if is_local else _hub_problem(where, hub_revision)
    try:
        return AutoConfig.from_pretrained(where, revision=hub_revision, local_files_only=problem is not None)
    except (OSError, ValueError, KeyError) as exc:  # missing file, unknown model type, hub errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ValueError(f"cannot read a model config from {where}: {reason}") from None
        rev = f" at revision {hub_revision}" if hub_revision else ""
        raise ValueError(
            f"cannot fetch model {model!r}{rev} from the Hugging Face hub ({problem or type(exc).__name__}); "
            f"download it where the hub is reachable and pass --model /path/to/local/dir"
        ) from None


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
    config = load_config(model, revision)
    description = describe_targets(config, layers=layers, matrices=matrices)
    if as_json:
        sys.stdout.write(json.dumps({"model": model, **description.to_dict()}, indent=2) + "\n")
        return
    stdout.print(description.format(), highlight=False, markup=False, soft_wrap=True)
