"""Task files: your own prompts and answers, one example per line, in ``.jsonl`` or ``.csv``.

Each example has a ``prompt`` and an ``answer`` (a string of any number of tokens), and may have
a ``distractor`` (the in-context competitor whose probability the answer's is compared with, as
IOI's subject) and ``choices`` (a list the answer must be one of: the task is then scored by
which choice the model finds most likely). In CSV, ``choices`` is a JSON list (``["yes", "no"]``)
or ``|``-separated (``yes|no``). Other columns / keys are kept in ``Example.extra``.

The answer is scored as the text that follows the prompt: a single space joins them unless the
prompt ends with whitespace or the answer starts with it (``"answer": "Paris"`` after
``"The capital of France is"`` scores ``" Paris"``); :func:`continuation` is that rule.

Every problem is a one-line ``ValueError`` naming the file and the line number (1-based; a CSV's
header is line 1).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_SUFFIXES = (".jsonl", ".csv")
_FIELDS = ("prompt", "answer", "distractor", "choices")


@dataclass(frozen=True)
class Example:
    """One line of a task file. ``line`` is its 1-based line number in the file."""

    prompt: str
    answer: str
    line: int
    distractor: str | None = None
    choices: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TaskFile:
    """The examples of a task file, in file order, and the file's identity for the record."""

    path: str
    name: str  # the file's stem: the task's name in results
    sha256: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def is_choice(self) -> bool:
        """True when every example has choices (scored by argmax over them)."""
        return all(e.choices is not None for e in self.examples)


def continuation(prompt: str, text: str) -> str:
    """The text scored after ``prompt``: ``text`` with a joining space unless one side has it."""
    if not text or text[0].isspace() or (prompt and prompt[-1].isspace()):
        return text
    return " " + text


def _split_choices(raw: str) -> list[str]:
    stripped = raw.strip()
    if stripped.startswith("["):
        value = json.loads(stripped)
        if not isinstance(value, list):
            raise ValueError("choices is not a list")
        return value
    return [part.strip() for part in raw.split("|")]


def _example(path: str, line: int, row: dict[str, Any]) -> Example:
    where = f"{path}:{line}"

    def text_field(name: str, required: bool) -> str | None:
        value = row.get(name)
        if value is None or (value == "" and not required):
            if required:
                raise ValueError(f"{where}: missing field {name!r}; each example needs 'prompt' and 'answer'")
            return None
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} is {type(value).__name__} {value!r}, not a string")
        if not value.strip():
            raise ValueError(f"{where}: field {name!r} is empty")
        return value

    prompt = text_field("prompt", True)
    answer = text_field("answer", True)
    assert prompt is not None and answer is not None
    distractor = text_field("distractor", False)
    raw_choices = row.get("choices")
    choices: tuple[str, ...] | None = None
    if raw_choices is not None and raw_choices != "":
        if isinstance(raw_choices, str):
            try:
                raw_choices = _split_choices(raw_choices)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{where}: choices {raw_choices!r} is not a JSON list or a|b|c ({exc})") from None
        if not isinstance(raw_choices, list) or not all(isinstance(c, str) and c.strip() for c in raw_choices):
            raise ValueError(f"{where}: choices {raw_choices!r} must be a list of non-empty strings")
        if len(raw_choices) < 2:
            raise ValueError(f"{where}: choices {raw_choices!r} has fewer than 2 entries")
        if len(set(raw_choices)) != len(raw_choices):
            raise ValueError(f"{where}: choices {raw_choices!r} repeats an entry")
        if answer not in raw_choices:
            raise ValueError(f"{where}: answer {answer!r} is not among its choices {raw_choices!r}")
        choices = tuple(raw_choices)
    extra = {k: v for k, v in row.items() if k not in _FIELDS}
    return Example(prompt=prompt, answer=answer, line=line, distractor=distractor, choices=choices, extra=extra)


def _jsonl_rows(path: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}: a line must be a JSON object with 'prompt' and 'answer'; got {type(value).__name__}"
            )
        rows.append((number, value))
    return rows


def _csv_rows(path: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise ValueError(f"{path}:1: unreadable CSV header ({exc})") from None
    header = [h.strip() for h in header]
    missing = [name for name in ("prompt", "answer") if name not in header]
    if missing:
        raise ValueError(f"{path}:1: the header has no {' or '.join(repr(m) for m in missing)} column; it has {header}")
    rows = []
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.line_num}: unreadable CSV line ({exc})") from None
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise ValueError(f"{path}:{line}: {len(values)} fields where the header has {len(header)}")
        rows.append((line, dict(zip(header, values))))
    return rows


def load_task(path: str | os.PathLike[str]) -> TaskFile:
    """The examples of a ``.jsonl`` or ``.csv`` task file, checked, with the file's sha256."""
    file = Path(path)
    shown = str(path)
    if file.suffix.lower() not in TASK_SUFFIXES:
        raise ValueError(f"{shown}: unknown task file extension {file.suffix!r}; allowed: {', '.join(TASK_SUFFIXES)}")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ValueError(f"{shown}: cannot read the task file ({exc.strerror or type(exc).__name__})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{shown}:{line}: not UTF-8 text") from None
    rows = _jsonl_rows(shown, text) if file.suffix.lower() == ".jsonl" else _csv_rows(shown, text)
    if not rows:
        raise ValueError(f"{shown}: the task file holds no examples")
    examples = tuple(_example(shown, line, row) for line, row in rows)
    return TaskFile(path=shown, name=file.stem, sha256=hashlib.sha256(data).hexdigest(), examples=examples)


def is_task_file(name: str) -> bool:
    """True when ``name`` (a ``--task`` value) names a task file rather than a built-in task."""
    return name.lower().endswith(TASK_SUFFIXES)


def describe(examples: Sequence[Example]) -> str:
    """A few words on a task: how many examples, with choices and distractors."""
    n_choice = sum(e.choices is not None for e in examples)
    n_distractor = sum(e.distractor is not None for e in examples)
    return f"{len(examples)} examples ({n_choice} with choices, {n_distractor} with a distractor)"


__all__ = ["Example", "TaskFile", "continuation", "describe", "is_task_file", "load_task"]
