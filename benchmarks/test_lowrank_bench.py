"""pytest-benchmark comparisons: fasttrunc's low-rank linear (as planned, and with the fused kernels
the rules choose) vs dense F.linear vs torch's two GEMMs, bf16, on Pythia MLP shapes (CUDA only;
skipped without it).

    python -m pytest benchmarks/test_lowrank_bench.py --benchmark-group-by=param:case

Times are eager per call (each round is `calls` back-to-back calls, then one synchronize), so
they include host launch cost, as in a generate() loop. Kernel times under CUDA-graph replay and
the full grid come from benchmarks/bench_lowrank.py.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = {
    "2048x8192 r128 M1": (2048, 8192, 128, 1),
    "8192x2048 r128 M1": (8192, 2048, 128, 1),
    "5120x20480 r128 M16": (5120, 20480, 128, 16),
    "2048x8192 r128 M256": (2048, 8192, 128, 256),
    "8192x2048 r128 M4096": (8192, 2048, 128, 4096),
    "5120x20480 r512 M4096": (5120, 20480, 512, 4096),
}
CALLS = 50  # calls per round: amortizes the synchronize that ends each round


def _operands(k, n, r, m):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).cuda().bfloat16()
    a = (torch.randn(r, k, generator=gen) / math.sqrt(k)).cuda().bfloat16()
    b = (torch.randn(n, r, generator=gen) / math.sqrt(r)).cuda().bfloat16()
    return x, a, b


def _variant(name, x, a, b):
    import torch.nn.functional as F

    import fasttrunc

    if name == "fasttrunc":
        return lambda: fasttrunc.lowrank_linear(x, a, b)  # the cost planner's choice (cuBLAS where it wins)
    if name == "fused_kernels":
        from fasttrunc.kernels.lowrank_plan import LowrankTunables

        rules = LowrankTunables(cost_model=None)  # the Triton kernels wherever the rules allow them
        return lambda: fasttrunc.lowrank_linear(x, a, b, tunables=rules)
    if name == "dense":
        w = (b.float() @ a.float()).bfloat16()
        return lambda: F.linear(x, w)
    at, bt = a.T, b.T
    return lambda: (x @ at) @ bt


@pytest.mark.parametrize("variant", ["fasttrunc", "fused_kernels", "dense", "two_gemms"])
@pytest.mark.parametrize("case", list(CASES))
def test_lowrank_linear(benchmark, case, variant):
    x, a, b = _operands(*CASES[case])
    fn = _variant(variant, x, a, b)
    with torch.no_grad():
        from fasttrunc.kernels.lowrank import lowrank_linear_reference

        ref = lowrank_linear_reference(x, a, b).float()
        assert (fn().float() - ref).norm() / ref.norm() < 2e-2  # correctness before timing

        def rounds():
            for _ in range(CALLS):
                fn()
            torch.cuda.synchronize()

        benchmark.extra_info["calls_per_round"] = CALLS
        benchmark.pedantic(rounds, rounds=20, warmup_rounds=2)
