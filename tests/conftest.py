"""Test setup: Triton's CPU interpreter on (before triton is imported), gpu marker, test data."""

import dataclasses
import os
from pathlib import Path

# Must precede any import of triton: the interpreter is chosen when triton loads. A GPU run
# leaves it off so the same files exercise the native kernels.
if os.environ.get("FASTTRUNC_TEST_NATIVE", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_DATA = Path(__file__).resolve().parent / "data"
TOKENIZER_JSON = TEST_DATA / "gpt-neox-20b-tokenizer.json"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def neox_tokenizer_path() -> Path:
    """The real GPT-NeoX tokenizer shipped in tests/data (see its README)."""
    assert TOKENIZER_JSON.is_file(), f"{TOKENIZER_JSON} is missing from the repository"
    return TOKENIZER_JSON


def _assert_metrics_close(got, want) -> None:
    """Two metrics dataclasses agree field by field (fp32 forwards: relative 1e-5, absolute 1e-6 near 0)."""
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        assert (a is None) == (b is None), field.name
        if b is not None:
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), field.name


@pytest.fixture
def metrics_close():
    """The comparison of two metrics dataclasses the sweep tests share."""
    return _assert_metrics_close


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
