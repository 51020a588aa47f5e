"""The run protocol every experiment and benchmark shares.

- progress: ``progress(stage, done, total, detail)``; ``stage`` names the phase (``"training"``,
  ``"sweep"``), so a front end keeps one bar per stage without parsing text;
- results: dataclasses whose ``to_dict()`` is JSON-ready and carries the environment;
- devices and dtypes: resolving a device name, dtype names, the compute-dtype rule, a device sync;
- CPU threads: the context manager that runs a block single-threaded and gives the count back;
- output files: checking an output directory before the work, and writing files atomically.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fasttrunc import checks

# progress(stage, done, total, detail): called as work advances; None means silent.
Progress = Callable[[str, int, int, str], None] | None


def report(progress: Progress, stage: str, done: int, total: int, detail: str = "") -> None:
    if progress is not None:
        progress(stage, done, total, detail)


def environment() -> dict[str, Any]:
    """Versions and hardware a result was obtained with."""
    import fasttrunc

    env: dict[str, Any] = {
        "fasttrunc": fasttrunc.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses as dicts, tensors as lists, inf/nan as strings/None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class ResultMixin:
    """``to_dict()`` for a result dataclass: its fields, JSON-ready, plus ``environment``."""

    def to_dict(self) -> dict[str, Any]:
        out = jsonable(self)
        out.setdefault("environment", environment())
        return out


def resolve_device(device: object) -> torch.device:
    """A torch device that exists on this machine, or a one-line ValueError saying what does."""
    if not isinstance(device, str | torch.device):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} is not available: this machine has no CUDA device; use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} does not exist; this machine has cuda:0..cuda:{count - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU), so a timer reads finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: object) -> torch.dtype:
    """The torch dtype of a dtype name (float32, float16, bfloat16)."""
    return DTYPES[checks.choice("dtype", name, DTYPES)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What products of ``dtype`` tensors are accumulated and factorized in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def cpu_threads(n: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads when ``device`` is a CPU, then restore.

    The toy models' matrices are at most a few hundred wide: too small for intra-op threads to
    pay, and on a busy 2-core machine their synchronisation made steps 4-30x slower (measured by
    each experiment). On other devices the block runs unchanged.
    """
    checks.positive("cpu_threads", n)
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- output files ------------------------------------------------------------------------------


def check_output_dir(path: object, option: str = "--out") -> Path:
    """Make sure ``path`` is, or can be created as, a writable directory; create it; return it.

    Called before any work, so that a run never computes for an hour and then fails to save. A
    file in the way, a parent that is a file, or a read-only place is a one-line ValueError.
    """
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"{option} {path!r} is not a path")
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{option} {directory} exists and is not a directory")
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {directory} is under {parent}, which is a file")
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fasttrunc-probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {directory} is not writable: {exc.strerror or type(exc).__name__}") from None
    return directory


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success rename it onto ``path``.

    A crash or an exception while writing leaves ``path`` as it was (absent, or the old file) and
    removes the temporary file, so no reader ever sees half a file.
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix or ".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


RECORD_SUFFIXES = (".jsonl", ".csv")


def check_records_path(path: object, option: str = "--save-predictions") -> Path:
    """A ``.jsonl`` or ``.csv`` file that can be written (its directory is created); checked before the work."""
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"{option} {path!r} is not a path")
    file = Path(path).expanduser()
    if file.suffix.lower() not in RECORD_SUFFIXES:
        raise ValueError(f"{option} {file}: unknown extension {file.suffix!r}; allowed: {', '.join(RECORD_SUFFIXES)}")
    if file.is_dir():
        raise ValueError(f"{option} {file} is a directory; give a file name")
    check_output_dir(file.parent, option)
    return file


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def write_records(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (JSON-ready mappings) atomically: one JSON object a line (``.jsonl``) or CSV.

    A CSV's header is every key in the order first seen; a missing value is an empty cell, a
    number, boolean or list is written as JSON.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    checks.choice("records file extension", suffix, RECORD_SUFFIXES)
    if suffix == ".jsonl":
        return atomic_write_text(file, "".join(json.dumps(row) + "\n" for row in rows))
    header = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_cell(row.get(key)) for key in header])
    with atomic_output(file) as tmp:
        tmp.write_text(buffer.getvalue(), newline="")
    return file
