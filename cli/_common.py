"""Shared CLI plumbing: one-line errors (exit 2), rich progress on stderr, table / JSON / --out.

Kept free of torch imports so that ``fasttrunc --help`` stays fast; commands import the library
inside their bodies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from fasttrunc import checks


class Result(Protocol):
    """What a command prints: an experiment's or a benchmark's result (fasttrunc.runs.ResultMixin)."""

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Result)

stderr = Console(stderr=True)
stdout = Console()


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def fail(message: str) -> NoReturn:
    """Print ``Error: message`` on one line of stderr and exit with code 2 (a usage error), no traceback."""
    stderr.print(f"[bold red]Error:[/] {escape(_one_line(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def user_errors(fn: Callable) -> Callable:
    """Turn the ValueError / FileNotFoundError a user's bad input raises into a one-line exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc) or type(exc).__name__)

    return wrapper


def _click_class(name: str) -> type[Exception]:
    """click's exception class ``name`` as the installed Typer raises it (some Typers vendor click)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_USAGE_ERROR = _click_class("UsageError")
_CLICK_ERRORS: tuple[type[Exception], ...] = tuple({click.ClickException, _click_class("ClickException")})
_ABORTS: tuple[type[Exception], ...] = tuple({click.exceptions.Abort, typer.Abort})


class OneLineErrors(TyperGroup):
    """The app's group: click's usage errors (bad type, unknown option, missing option) as one line.

    Typer draws them as a usage line, a hint and a boxed message over several lines; here they
    read like every other error, ``Error: ...`` on one line of stderr, exit 2.
    """

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # Typer has printed the help already
                sys.exit(exc.exit_code)  # type: ignore[attr-defined]
            message = exc.format_message()  # type: ignore[attr-defined]
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                message += f" (see {ctx.command_path} --help)"
            stderr.print(f"[bold red]Error:[/] {escape(_one_line(message))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        except _ABORTS:
            stderr.print("Aborted.", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# --- integer options: one rule per option, the same in every command ---------------------------

# Each integer option that several commands take, and the range it accepts in all of them: the
# widest range every command's config accepts (steps and batch sizes stop at the million the
# memory experiment allows; seeds are checks.seed's range).
INT_RULES: dict[str, tuple[int, int | None]] = {
    "--seed": (0, checks.SEED_MAX),
    "--steps": (1, 1_000_000),
    "--batch-size": (1, 1_000_000),
    "--n": (1, 1_000_000),
    "--reps": (1, 100),
}


def ranged_int(option: str, low: int, high: int | None) -> Callable[[Any], int]:
    """A parser of ``option``'s value: an integer in ``[low, high]``, else a one-line usage error.

    The message is the library's (``--seed -1 is out of range; allowed: an integer in [0, ...]``).
    """

    def parse(value: Any) -> int:
        number = value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = int(value.strip())
        try:
            return checks.integer(option, number, low, high)
        except ValueError as exc:
            raise _USAGE_ERROR(str(exc)) from None

    return parse


def int_option(default: Any, name: str, help: str) -> Any:
    """``typer.Option`` for the integer option ``name`` under its rule in :data:`INT_RULES`."""
    low, high = INT_RULES[name]
    allowed = f"{low} or more" if high is None else f"{low} to {high}"
    return typer.Option(
        default, name, parser=ranged_int(name, low, high), metavar="INTEGER", help=f"{help} ({allowed}.)"
    )


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[str, int, int, str], None] | None]:
    """A ``progress(stage, done, total, detail)`` callback drawing a rich bar (with ETA) on stderr.

    None when stderr is not a terminal: rich draws nothing there but a blank line at the end.
    """
    if not enabled or not stderr.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def update(stage: str, done: int, total: int, detail: str = "") -> None:
            description = f"{stage}: {detail}" if detail else stage
            if stage not in tasks:
                tasks[stage] = bar.add_task(description, total=total)
            bar.update(tasks[stage], completed=done, total=total, description=description)

        yield update


def make_table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    return table


def check_out(out: Path | None, option: str = "--out") -> Path | None:
    """Create ``out`` and check that files can be written in it, before any work; else a one-line exit 2."""
    if out is None:
        return None
    from fasttrunc.runs import check_output_dir

    try:
        return check_output_dir(out, option)
    except ValueError as exc:
        fail(str(exc))


def check_models(model: str, revisions: Iterable[str | None]) -> None:
    """Check ``--model`` (a local directory: each revision's) before any work; else a one-line exit 2."""
    from fasttrunc.hub import check_source

    for revision in revisions:
        try:
            check_source(model, revision)
        except ValueError as exc:
            fail(str(exc))


def _file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_plots(result: R, out: Path, plots: Callable[[R, Path], list[Path]]) -> list[Path]:
    """Draw the plots into a hidden folder in ``out``, then rename each into ``out``: never half a file."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".fasttrunc-plots-"))
    try:
        written = []
        for path in plots(result, staging):
            target = out / Path(path).relative_to(staging)
            os.replace(path, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def emit(
    result: R,
    *,
    as_json: bool,
    out: Path | None,
    tables: Callable[[R], list[Table]],
    plots: Callable[[R, Path], list[Path]] | None = None,
) -> None:
    """Print the result (tables, or JSON only with ``--json``); with ``out`` write results.json and plots.

    Files are written under temporary names and renamed, so a crash leaves the old file or none.
    """
    data = result.to_dict()
    if out is not None:
        from fasttrunc.runs import atomic_output

        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / "results.json") as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.chmod(tmp, _file_mode())  # a temporary file is private (0600); results are not
        written = [out / "results.json"]
        if plots is not None:
            written += _write_plots(result, out, plots)
        if not as_json:
            stderr.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for table in tables(result):
        stdout.print(table)


def given_on_command_line(ctx: typer.Context) -> set[str]:
    """The parameters the user typed (or set through the environment), not left at their defaults."""
    explicit = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            explicit.add(name)
    return explicit
