"""The rSVD benchmark's config checks (its tiny-set run is part of benchmarks/gpu_check.sh --dry-run)."""

from __future__ import annotations

import pytest

from fasttrunc.bench.svd import SvdBenchConfig


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"sets": ("pythia-70m",)}, r"matrix set 'pythia-70m' is not known; allowed: pythia-1\.4b-mlp"),
        ({"ranks": (0,)}, r"rank 0 is out of range; allowed: an integer in \[1, 1024\]"),
        ({"ranks": ()}, r"ranks is empty"),
        ({"reps": 0}, r"reps 0 is out of range"),
        ({"reps": 2.5}, r"reps 2\.5 is not an integer"),
    ],
)
def test_svd_bench_config_rejects_bad_values(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        SvdBenchConfig(**change)


def test_svd_bench_config_is_frozen():
    config = SvdBenchConfig(sets=("tiny",), ranks=(3,))
    with pytest.raises(AttributeError):
        config.reps = 5  # type: ignore[misc]
