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


_BACKEND_BYTES, _INTERPRET_BYTES = b"FASTTRUNC_BACKEND", b"TRITON_INTERPRET"


def _environment() -> tuple[str | bytes | None, str | bytes | None]:
    """(FASTTRUNC_BACKEND, TRITON_INTERPRET) as the process has them now, None when unset.

    ``os.environ.get`` encodes the key and decodes the value (about 0.7 us each on this CPU, most
    of an eager call's budget). On POSIX, ``os.environ`` keeps its values in a dict of bytes that
    every ``os.environ[...] = ...`` (monkeypatch's included) updates in place: the raw values come
    from one dict lookup each, and :func:`use_triton` keys its decisions on them undecoded.
    Elsewhere, or if ``os.environ`` was replaced by another mapping, the plain lookups.
    """
    data = getattr(os.environ, "_data", None)
    if type(data) is dict and os.name == "posix":
        return data.get(_BACKEND_BYTES), data.get(_INTERPRET_BYTES)
    return os.environ.get("FASTTRUNC_BACKEND"), os.environ.get("TRITON_INTERPRET")


def _text(value: str | bytes | None, default: str) -> str:
    if value is None:
        return default
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# (FASTTRUNC_BACKEND, TRITON_INTERPRET, device type) -> the decision: the environment is read on
# every call (two lookups), only its interpretation is kept (an eager decode step asks per layer).
_DECISIONS: dict[tuple[str | bytes | None, str | bytes | None, str], bool] = {}


def use_triton_on(device_type: str) -> bool:
    """True when the Triton kernel should serve tensors of this device type (``"cuda"``, ``"cpu"``)."""
    backend, interpret = _environment()
    key = (backend, interpret, device_type)
    decision = _DECISIONS.get(key)
    if decision is None:
        decision = _decide(_text(backend, ""), _text(interpret, "0"), device_type)
        _DECISIONS[key] = decision
    return decision


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should serve these tensors (all on one device)."""
    return use_triton_on(tensors[0].device.type)


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
