"""The small validators every public entry uses, so that every bad value gets the same kind of message.

Each check takes the parameter's name and the value given, returns the value in its canonical form
(a plain ``int`` for numpy integers, a ``float`` for a fraction) and otherwise raises a one-line
``ValueError`` (a wrong *kind* of value is a ``TypeError``) that names the parameter, shows the
value and says what is allowed. Nothing here imports torch: configs validate before any work.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def show(value: object) -> str:
    """``repr(value)`` on one line (a numpy array's repr spans several) and at most 80 characters."""
    text = re.sub(r"\s*\n\s*", " ", repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(value: object) -> bool:
    """True for ``int`` and numpy integers, False for ``bool`` (which Python counts as an int)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """True for ints and floats (numpy's too), False for ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a plain int within ``[low, high]`` (either bound may be open)."""
    if not is_int(value):
        raise ValueError(f"{name} {show(value)} is not an integer; allowed: {_range(low, high)}")
    number = int(value)  # type: ignore[call-overload]
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} {number} is out of range; allowed: {_range(low, high)}")
    return number


def _range(low: float | None, high: float | None) -> str:
    if low is None and high is None:
        return "any integer"
    if high is None:
        return f"an integer >= {low}"
    if low is None:
        return f"an integer <= {high}"
    return f"an integer in [{low}, {high}]"


def positive(name: str, value: object) -> int:
    """An integer >= 1 (a count of things, steps, rows)."""
    return integer(name, value, 1)


def non_negative(name: str, value: object) -> int:
    return integer(name, value, 0)


# Seeds: torch.manual_seed takes any value in [-2**63, 2**64); fasttrunc keeps to the part every
# generator it seeds (torch, numpy, random) accepts the same way.
SEED_MAX = 2**63 - 1


def seed(name: str, value: object) -> int:
    return integer(name, value, 0, SEED_MAX)


def real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real within the given bounds (closed unless ``*_open``), as a float."""
    allowed = _interval(low, high, low_open, high_open)
    if not is_real(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"{name} {show(value)} is not a finite number; allowed: {allowed}")
    number = float(value)  # type: ignore[arg-type]
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name} {number!r} is out of range; allowed: {allowed}")
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(f"{name} {number!r} is out of range; allowed: {allowed}")
    return number


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def fraction(name: str, value: object) -> float:
    """A number in [0, 1]."""
    return real(name, value, 0.0, 1.0)


def boolean(name: str, value: object) -> bool:
    """``True`` or ``False`` itself (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} {show(value)} is not a bool; allowed: True, False")
    return value


def choice(name: str, value: object, allowed: Iterable[T]) -> T:
    """``value`` if it is one of ``allowed``."""
    options = tuple(allowed)
    if not isinstance(value, str | int | float | type(None)) or value not in options:
        raise ValueError(f"{name} {show(value)} is not known; allowed: {', '.join(map(str, options))}")
    return value  # type: ignore[return-value]


def non_empty(name: str, values: object) -> list[Any]:
    """A non-empty list from a sequence (a single string is not a sequence of items here)."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{name} {show(values)} is not a list; give a non-empty list")
    if not values:
        raise ValueError(f"{name} is empty; give at least one value")
    return list(values)


def text(name: str, value: object) -> str:
    """A non-blank string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} {show(value)} is not a non-empty string")
    return value
