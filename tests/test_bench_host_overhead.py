"""benchmarks/host_overhead.py: the eager path's host time with the launch stubbed, measured for real."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
def test_host_overhead_measures_the_stubbed_cuda_path():
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from fasttrunc.kernels import _lowrank_launch

    def state():
        return (
            _lowrank_launch.is_cuda,
            _lowrank_launch.device_guard,
            _lowrank_launch.cuda_device_count,
            _lowrank_launch.BOUND,
            _lowrank_launch.two_gemms,
            os.environ.get("FASTTRUNC_BACKEND"),
        )

    before = state()
    data = module.measure(calls=50, repeats=1)
    assert set(data["us_per_call"]) == {"splitk", "tiled", "torch"}
    for variants in data["us_per_call"].values():
        assert set(variants) == {"bound", "bound_guarded", "full_path"}
        for us in variants.values():
            # Positive and far below an ordinary Triton launch from Python (benchmarks/BASELINES.md: ~12.8 us
            # of host time on the GPU machine's CPU; the interpreter's launch here costs milliseconds).
            assert 0 < us["cpu_us"] < 1000 and 0 < us["wall_us"]
    assert state() == before


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
def test_host_overhead_compares_run_bound_with_a_git_revision():
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from fasttrunc.kernels import _lowrank_launch

    before = (_lowrank_launch.is_cuda, _lowrank_launch.cuda_device_count)
    data = module.compare_bound("HEAD", calls=20, rounds=2)
    assert set(data) == {"splitk", "tiled"}
    for us in data.values():
        assert set(us) == {"current", "HEAD"} and all(0 < v < 1000 for v in us.values())
    assert (_lowrank_launch.is_cuda, _lowrank_launch.cuda_device_count) == before
    with pytest.raises(ValueError, match="revision 'no-such-rev' has no kernels/_lowrank_launch.py"):
        module.compare_bound("no-such-rev", calls=1, rounds=1)
