"""The Typer applications that command modules attach their commands to."""

from typing import Any

import typer

from fasttrunc.cli._common import OneLineErrors

_settings: dict[str, Any] = {"no_args_is_help": True, "rich_markup_mode": "rich", "pretty_exceptions_enable": False}
# One-line usage errors: the group the command line enters by.
_settings["cls"] = OneLineErrors

app = typer.Typer(
    help="fasttrunc truncates weight matrices of transformers to low rank and measures what the models then predict.",
    **_settings,
)
run_app = typer.Typer(help="Run one experiment and print its results.", **_settings)
sweep_app = typer.Typer(help="Sweep truncations over layers, matrices and ranks.", **_settings)
bench_app = typer.Typer(help="Time the fasttrunc kernels against torch on a CUDA device.", **_settings)

app.add_typer(run_app, name="run")
app.add_typer(sweep_app, name="sweep")
app.add_typer(bench_app, name="bench")
