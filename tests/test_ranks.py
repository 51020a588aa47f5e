import math

import numpy as np
import pytest

from fasttrunc.ranks import parse_rank, resolve_rank, validate_rank_spec


@pytest.mark.parametrize(
    "rank, out, inp, expected",
    [
        (0, 10, 20, 0),
        (7, 10, 20, 7),
        (10, 10, 20, 10),
        (0.0, 10, 20, 0),
        (1.0, 10, 20, 10),
        (0.5, 30, 20, 10),
        (0.05, 2048, 8192, 102),  # int(0.05 * 2048) = 102
        (0.99, 7, 9, 6),  # floor, not round
        (np.int64(3), 5, 5, 3),
        (np.float32(0.5), 8, 8, 4),
        (1, 3, 3, 1),  # int 1 is an absolute rank, not rho = 1
    ],
)
def test_resolve_rank(rank, out, inp, expected):
    assert resolve_rank(rank, out, inp) == expected


@pytest.mark.parametrize(
    "rank, match",
    [
        (-1, "negative"),
        (11, "exceeds the maximum rank 10"),
        (-0.1, r"not a fraction in \[0, 1\]"),
        (1.5, r"not a fraction in \[0, 1\]"),
        (math.nan, r"not a fraction"),
        (math.inf, r"not a fraction"),
        (True, "not a number"),
        ("0.5", "not a number"),
        (None, "not a number"),
        ([1], "not a number"),
    ],
)
def test_resolve_rank_rejects(rank, match):
    with pytest.raises(ValueError, match=match) as info:
        resolve_rank(rank, 10, 20)
    assert "\n" not in str(info.value)
    assert repr(rank) in str(info.value) or str(rank) in str(info.value)


def test_validate_rank_spec_needs_no_shape():
    validate_rank_spec(10**6)  # an int's upper bound depends on the matrix
    with pytest.raises(ValueError):
        validate_rank_spec(2.0)


@pytest.mark.parametrize("text, value", [("12", 12), ("0", 0), ("0.05", 0.05), ("1.0", 1.0), (" 3 ", 3)])
def test_parse_rank(text, value):
    parsed = parse_rank(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["abc", "-3", "1.5", "nan", ""])
def test_parse_rank_rejects(text):
    with pytest.raises(ValueError):
        parse_rank(text)
