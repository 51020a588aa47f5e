"""Rank semantics, in one place.

An ``int`` is an absolute number of singular values in ``[0, min(out, in)]``; a ``float`` in
``[0, 1]`` is LASER's rho, the fraction of ``min(out, in)`` kept, ``int(rho * min(out, in))``.
Anything else (negative, above the maximum, NaN, infinite, bool, a string) is a ValueError that
names the value and the allowed range.
"""

from __future__ import annotations

import math
import numbers

from fasttrunc import checks
from fasttrunc.checks import show

Rank = int | float


def validate_rank_spec(rank: object, name: str = "rank") -> None:
    """Check the type and range a rank can have before any matrix is known (``name``: the argument's)."""
    if not checks.is_real(rank):
        raise ValueError(
            f"{name} {show(rank)} is not a number; give an int (absolute rank >= 0) or a float rho in [0, 1]"
        )
    if isinstance(rank, numbers.Integral):
        if int(rank) < 0:
            raise ValueError(f"{name} {rank} is negative; an int rank must be >= 0")
        return
    assert isinstance(rank, numbers.Real)  # is_real checked it
    value = float(rank)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} {rank!r} is not a fraction in [0, 1]; a float rank is rho, the kept fraction")


def resolve_rank(rank: object, out_features: int, in_features: int, *, name: str = "rank") -> int:
    """The absolute rank that ``rank`` means for an ``out_features x in_features`` matrix."""
    out_features = checks.non_negative("out_features", out_features)
    in_features = checks.non_negative("in_features", in_features)
    validate_rank_spec(rank, name)
    max_rank = min(out_features, in_features)
    if isinstance(rank, numbers.Integral):
        if int(rank) > max_rank:
            raise ValueError(
                f"{name} {rank} exceeds the maximum rank {max_rank} of a {out_features}x{in_features} matrix; "
                f"allowed: 0..{max_rank} or a float in [0, 1]"
            )
        return int(rank)
    assert isinstance(rank, numbers.Real)  # validate_rank_spec checked it
    return int(float(rank) * max_rank)


def parse_rank(text: str) -> Rank:
    """Parse a rank typed on a command line: ``"12"`` is an int, ``"0.05"`` or ``"1.0"`` a rho."""
    text = text.strip()
    try:
        value: Rank = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"rank {text!r} is not a number; give an int (absolute rank) or a float rho in [0, 1]"
            ) from None
    validate_rank_spec(value)
    return value
