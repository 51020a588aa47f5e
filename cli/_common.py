"""Shared CLI plumbing: one-line errors (exit 2), rich progress on stderr, table / JSON / --out.

Kept free of torch imports so that ``fasttrunc --help`` stays fast; commands import the library
inside their bodies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import typer
from rich.console import Console
from rich.table import Table


class Result(Protocol):
    """What a command prints: an experiment's or a benchmark's result (fasttrunc.runs.ResultMixin)."""

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Result)

stderr = Console(stderr=True)
stdout = Console()


def fail(message: str) -> NoReturn:
    """Print ``Error: message`` on stderr and exit with code 2 (a usage error), no traceback."""
    stderr.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def user_errors(fn: Callable) -> Callable:
    """Turn the ValueError / FileNotFoundError a user's bad input raises into a one-line exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    return wrapper


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[str, int, int, str], None] | None]:
    """A ``progress(stage, done, total, detail)`` callback drawing a rich bar (with ETA) on stderr."""
    if not enabled:
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


def check_out(out: Path | None) -> None:
    """Refuse an ``--out`` that cannot be a results directory before any work starts."""
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory; give a directory to write results into")


def emit(
    result: R,
    *,
    as_json: bool,
    out: Path | None,
    tables: Callable[[R], list[Table]],
    plots: Callable[[R, Path], list[Path]] | None = None,
) -> None:
    """Print the result (tables, or JSON only with ``--json``); with ``out`` write results.json and plots."""
    data = result.to_dict()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
        written = [out / "results.json"] + (plots(result, out) if plots is not None else [])
        if not as_json:
            stderr.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for table in tables(result):
        stdout.print(table)
