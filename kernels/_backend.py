"""The one place that decides Triton vs torch for a tensor.

Rules (DESIGN.md section 4):
- ``FASTTRUNC_BACKEND=torch`` forces the torch reference, ``FASTTRUNC_BACKEND=triton`` forces
  Triton (on a CPU tensor that needs ``TRITON_INTERPRET=1``, set before triton is imported);
- otherwise CUDA tensors use Triton, CPU tensors use torch unless Triton's interpreter is on.

The environment is read at call time, never at import time, and no hardware is probed.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_BACKENDS = ("torch", "triton")


class BackendError(RuntimeError):
    """A requested backend cannot run on the given tensors."""


# find_spec costs microseconds per call and an eager decode step asks once per layer: the answer
# is kept after the first call (a plain global, which torch.compile traces without warnings).
_TRITON_FOUND: bool | None = None


def _triton_installed() -> bool:
    global _TRITON_FOUND
    if _TRITON_FOUND is None:
        _TRITON_FOUND = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND


def _parse_backend(value: str) -> str | None:
    value = value.strip().lower()
    if not value:
        return None
    if value not in _BACKENDS:
        raise ValueError(f"FASTTRUNC_BACKEND={value!r} is not a backend; allowed: {', '.join(_BACKENDS)} (or unset)")
    return value


def requested_backend() -> str | None:
    """The backend forced by ``FASTTRUNC_BACKEND``, or None when it is unset or empty."""
    return _parse_backend(os.environ.get("FASTTRUNC_BACKEND", ""))


# (FASTTRUNC_BACKEND, TRITON_INTERPRET, device type) -> the decision: the environment is read on
# every call (two lookups), only its interpretation is kept (an eager decode step asks per layer).
_DECISIONS: dict[tuple[str, str, str], bool] = {}


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should serve these tensors (all on one device)."""
    environ = os.environ
    key = (environ.get("FASTTRUNC_BACKEND", ""), environ.get("TRITON_INTERPRET", "0"), tensors[0].device.type)
    decision = _DECISIONS.get(key)
    if decision is None:
        decision = _decide(*key)
        _DECISIONS[key] = decision
    return decision


def _decide(backend: str, interpret: str, device_type: str) -> bool:
    forced = _parse_backend(backend)
    if forced == "torch":
        return False
    runnable = _triton_installed() and (device_type == "cuda" or (device_type == "cpu" and interpret == "1"))
    if forced == "triton" and not runnable:
        raise BackendError(
            f"FASTTRUNC_BACKEND=triton cannot run on device type {device_type}: Triton needs CUDA, or "
            "TRITON_INTERPRET=1 set before triton is imported for CPU tensors"
        )
    return runnable
