"""truncated_svd: exact and randomized on prescribed spectra, batching, edge cases, bad input."""

import pytest
import torch

from fasttrunc import truncated_svd


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # The API's semantics on the torch path; the Triton path is tested in test_svd_kernel.py and
    # test_svd_accuracy.py (interpreted shapes are kept small there).
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


def matrix_with_spectrum(m, n, sigma, *, batch=(), seed=0, dtype=torch.float64):
    """A (batch, m, n) matrix whose singular values are exactly ``sigma`` (length min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    w = u @ torch.diag_embed(sigma.to(torch.float64).expand(*batch, k)) @ v.mT
    return w.to(dtype)


def optimal_error(sigma, k):
    return sigma[k:].pow(2).sum().sqrt().item()


def truncation_error(w, u, s, vh):
    return torch.linalg.matrix_norm(w.double() - u.double() @ torch.diag_embed(s.double()) @ vh.double()).max().item()


@pytest.mark.parametrize("m, n", [(60, 40), (40, 60), (33, 33)])
def test_exact_is_eckart_young_optimal(m, n):
    sigma = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    w = matrix_with_spectrum(m, n, sigma, dtype=torch.float32)
    for k in (1, 5, 17):
        u, s, vh = truncated_svd(w, k)
        assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
        assert u.dtype == s.dtype == vh.dtype == torch.float32
        assert truncation_error(w, u, s, vh) == pytest.approx(optimal_error(sigma, k), rel=1e-4, abs=1e-6)
        assert torch.all(s[:-1] >= s[1:])


@pytest.mark.parametrize("spectrum", ["harmonic", "geometric"])
def test_randomized_close_to_optimal(spectrum):
    m, n, k = 300, 120, 10
    i = torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    sigma = 1.0 / i if spectrum == "harmonic" else 0.8**i
    w = matrix_with_spectrum(m, n, sigma, dtype=torch.float32)
    u, s, vh = truncated_svd(w, k, method="randomized", generator=torch.Generator().manual_seed(1))
    assert truncation_error(w, u, s, vh) <= 1.01 * optimal_error(sigma, k)
    torch.testing.assert_close(s.double(), sigma[:k], rtol=1e-2, atol=0)
    eye = torch.eye(k)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-4, rtol=0)


def test_randomized_is_reproducible_with_a_generator():
    w = torch.randn(80, 50)
    first = truncated_svd(w, 8, method="randomized", generator=torch.Generator().manual_seed(3))
    second = truncated_svd(w, 8, method="randomized", generator=torch.Generator().manual_seed(3))
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_batched_matches_one_by_one(method):
    sigma = 1.0 / torch.arange(1, 41, dtype=torch.float64)
    w = matrix_with_spectrum(70, 40, sigma, batch=(3,), dtype=torch.float32)
    u, s, vh = truncated_svd(w, 6, method=method, generator=torch.Generator().manual_seed(0))
    assert u.shape == (3, 70, 6) and s.shape == (3, 6) and vh.shape == (3, 6, 40)
    for i in range(3):
        _, s_i, _ = truncated_svd(w[i], 6)
        torch.testing.assert_close(s[i], s_i, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_rank_zero_full_rank_and_rho(method):
    w = torch.randn(12, 9)
    u, s, vh = truncated_svd(w, 0, method=method)
    assert u.shape == (12, 0) and s.shape == (0,) and vh.shape == (0, 9)
    u, s, vh = truncated_svd(w, 9, method=method)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, w, atol=1e-5, rtol=1e-5)
    assert truncated_svd(w, 0.5, method=method)[1].shape == (4,)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_zero_and_rank_deficient_matrices_give_no_nan(method):
    zero = torch.zeros(50, 30)
    deficient = torch.randn(50, 2) @ torch.randn(2, 30)
    for w in (zero, deficient):
        u, s, vh = truncated_svd(w, 5, method=method, oversample=5)
        assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()
        torch.testing.assert_close(u @ torch.diag(s) @ vh, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_kept(dtype):
    w = torch.randn(20, 10).to(dtype)
    u, s, vh = truncated_svd(w, 3)
    assert u.dtype == s.dtype == vh.dtype == dtype


def test_bad_input():
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match="method 'lanczos'"):
        truncated_svd(w, 2, method="lanczos")
    with pytest.raises(ValueError, match="exceeds the maximum rank 8"):
        truncated_svd(w, 9)
    with pytest.raises(ValueError, match="shape"):
        truncated_svd(torch.randn(5), 1)
    with pytest.raises(ValueError, match="dtype"):
        truncated_svd(torch.ones(4, 4, dtype=torch.int64), 1)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        truncated_svd(bad, 2)
    with pytest.raises(ValueError, match="n_iter"):
        truncated_svd(w, 2, method="randomized", n_iter=-1)
