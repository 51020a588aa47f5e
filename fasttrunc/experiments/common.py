"""Pieces every experiment shares: the progress protocol, results as JSON, device checks."""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Callable
from typing import Any

import torch

# progress(done, total, description): called by run() as work advances; None means silent.
Progress = Callable[[int, int, str], None] | None


def report(progress: Progress, done: int, total: int, description: str) -> None:
    if progress is not None:
        progress(done, total, description)


def environment() -> dict[str, Any]:
    """Versions and hardware a result was obtained with."""
    import fasttrunc

    env = {
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
    return env


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class ResultMixin:
    """``to_dict()`` for a result dataclass: its fields, JSON-ready, plus ``environment``."""

    def to_dict(self) -> dict[str, Any]:
        out = _jsonable(self)
        out.setdefault("environment", environment())
        return out


def resolve_device(device: str) -> torch.device:
    """A torch device that exists on this machine, or a one-line ValueError saying what does."""
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


def check_fraction(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ValueError(f"{name} {value!r} is outside [0, 1]")
    return float(value)
