"""A sweep's cells streamed to ``DIR/cells.jsonl`` as they finish, and read back to resume.

One JSON object a line: ``{"config": <hash>, "revision": ..., "cell": {...}}``, each line flushed
and fsynced before the next cell starts, so a sweep killed at any moment loses at most the cells
in flight. Reading checks every line: a torn last line (the kill came mid-write) is dropped and
its cell redone, with a note; any other line that does not parse, or a line of another config,
is a one-line error naming the line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fasttrunc.experiments.sweep import Cell, CellKey, SweepConfig
from fasttrunc.runs import jsonable
from fasttrunc.tasks.answers import AnswerMetrics
from fasttrunc.tasks.metrics import TaskMetrics

FILE = "cells.jsonl"
# Fields that change how a sweep runs, not what it computes: a resumed sweep may change them.
RUN_ONLY = ("cache_budget_mb", "compose", "save_predictions", "hub_record")


def config_hash(config: SweepConfig) -> str:
    """A short hash of everything in ``config`` that decides the cells' numbers."""
    data = {k: v for k, v in jsonable(config).items() if k not in RUN_ONLY}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _number(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf") else (float("nan") if value is None else value)


def _metrics(data: dict[str, Any]) -> TaskMetrics | AnswerMetrics:
    """A task's metrics as written: LASER's (a task file: it has log_loss) or the paper's."""
    cls: type[TaskMetrics] | type[AnswerMetrics] = AnswerMetrics if "log_loss" in data else TaskMetrics
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        optional = "None" in str(f.type)  # a metric some tasks lack (written as null, kept as None)
        values[f.name] = value if (optional and value is None) else _number(value)
    return cls(**values)


def cell_from_dict(data: dict[str, Any]) -> Cell:
    return Cell(
        layer=int(data["layer"]),
        matrix=str(data["matrix"]),
        rank=data["rank"],
        ranks={str(k): int(v) for k, v in data["ranks"].items()},
        select={t: _metrics(m) for t, m in data["select"].items()},
        report={t: _metrics(m) for t, m in data["report"].items()},
        form=str(data.get("form", "factored")),
        evaluated=bool(data.get("evaluated", True)),
        estimate_prompts=int(data.get("estimate_prompts", 0)),
        kind=str(data.get("kind", "keep-top")),
    )


class CellLog:
    """``DIR/cells.jsonl`` of one sweep config: read what is there, append what finishes."""

    def __init__(self, directory: Path, config: SweepConfig):
        self.path = Path(directory) / FILE
        self.hash = config_hash(config)

    def load(self, resume: bool) -> tuple[dict[str | None, dict[CellKey, Cell]], list[str]]:
        """The cells already finished, by revision, and notes for stderr.

        Without ``resume`` a file with cells in it is refused (nothing written is overwritten).
        """
        notes: list[str] = []
        done: dict[str | None, dict[CellKey, Cell]] = {}
        if not self.path.exists():
            return done, notes
        raw = self.path.read_bytes()
        if not resume:
            if raw.strip():
                raise ValueError(
                    f"{self.path} already holds cells of a sweep; pass --resume to continue it, or give another --out"
                )
            return done, notes
        lines = raw.split(b"\n")
        keep = len(raw)
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            last = number == len(lines)  # no newline after it: the write was cut short
            try:
                entry = json.loads(line)
                cell = cell_from_dict(entry["cell"])
                entry_hash, revision = entry["config"], entry["revision"]
            except (ValueError, KeyError, TypeError, AttributeError):
                if last:
                    keep = len(raw) - len(line)
                    notes.append(
                        f"{self.path} line {number} was cut short (the sweep was killed mid-write); redoing it"
                    )
                    break
                raise ValueError(
                    f"{self.path} line {number} is not a cell of a sweep; fix or remove the file"
                ) from None
            if entry_hash != self.hash:
                raise ValueError(
                    f"{self.path} line {number} is from another sweep config (hash {entry_hash}, this one {self.hash}); "
                    "resume with the same options, or give another --out"
                )
            done.setdefault(revision, {})[cell.key] = cell
        if keep < len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())
        return done, notes

    def append(self, revision: str | None, cell: Cell) -> None:
        line = json.dumps({"config": self.hash, "revision": revision, "cell": jsonable(cell)}) + "\n"
        with open(self.path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
