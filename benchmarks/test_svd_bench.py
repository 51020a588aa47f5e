"""pytest-benchmark: fasttrunc's batched randomized SVD against torch on Pythia-1.4b MLP shapes (CUDA).

    python -m pytest benchmarks/test_svd_bench.py --benchmark-columns=median,min,max

24 matrices of 8192 x 2048 (fp32, singular values i^-0.5), k = 256, 2 power iterations and 10
oversamples for every method; compare the groups' medians. Skipped without CUDA.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, M, N, K, N_ITER, OVERSAMPLE = 24, 8192, 2048, 256, 2, 10


@pytest.fixture(scope="module")
def weights():
    from fasttrunc.bench.svd import _spectrum_matrices

    w, _ = _spectrum_matrices(BATCH, M, N, torch.Generator().manual_seed(0), torch.device("cuda"))
    return w


def _run(benchmark, fn):
    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    return benchmark.pedantic(synced, warmup_rounds=1, rounds=5, iterations=1)


@pytest.mark.benchmark(group="svd-1.4b-mlp-k256")
def test_fasttrunc_triton(benchmark, weights):
    from fasttrunc.kernels.svd import randomized_svd_triton

    gen = torch.Generator(device="cuda")
    u, s, vh = _run(
        benchmark,
        lambda: randomized_svd_triton(weights, K, n_iter=N_ITER, oversample=OVERSAMPLE, generator=gen.manual_seed(0)),
    )
    assert u.shape == (BATCH, M, K) and torch.isfinite(s).all()


@pytest.mark.benchmark(group="svd-1.4b-mlp-k256")
def test_fasttrunc_bf16_weights(benchmark, weights):
    from fasttrunc.kernels.svd import randomized_svd_triton

    stored = weights.to(torch.bfloat16)
    gen = torch.Generator(device="cuda")
    _, s, _ = _run(
        benchmark,
        lambda: randomized_svd_triton(stored, K, n_iter=N_ITER, oversample=OVERSAMPLE, generator=gen.manual_seed(0)),
    )
    assert torch.isfinite(s).all()


@pytest.mark.benchmark(group="svd-1.4b-mlp-k256")
def test_torch_svd_lowrank_looped(benchmark, weights):
    out = _run(benchmark, lambda: [torch.svd_lowrank(w, q=K + OVERSAMPLE, niter=N_ITER) for w in weights])
    assert len(out) == BATCH


@pytest.mark.benchmark(group="svd-1.4b-mlp-k256")
def test_plain_torch_batched_randomized(benchmark, weights):
    from fasttrunc.kernels.svd import randomized_svd_reference

    _, s, _ = _run(benchmark, lambda: randomized_svd_reference(weights, K, n_iter=N_ITER, oversample=OVERSAMPLE))
    assert torch.isfinite(s).all()
