"""TruncatedLinear: full-rank equivalence, Eckart-Young error, rank 0, dtypes, autograd, moves."""

import pytest
import torch
from torch import nn

from fasttrunc import TruncatedLinear, lowrank_linear


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # The layer's own semantics, independent of which kernel serves it.
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_f, out_f", [(17, 33), (33, 17), (24, 24)])
def test_full_rank_equals_linear(in_f, out_f, bias):
    linear = nn.Linear(in_f, out_f, bias=bias)
    layer = TruncatedLinear.from_linear(linear, 1.0)
    assert layer.rank == min(in_f, out_f)
    x = torch.randn(5, 7, in_f)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight, linear.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_weight_error_is_eckart_young(method):
    linear = nn.Linear(40, 64)
    s_all = torch.linalg.svdvals(linear.weight.double())
    for k in (1, 8, 20):
        layer = TruncatedLinear.from_linear(linear, k, method=method, generator=torch.Generator().manual_seed(0))
        err = torch.linalg.matrix_norm(linear.weight.double() - layer.weight.double()).item()
        optimal = s_all[k:].pow(2).sum().sqrt().item()
        bound = 1e-4 if method == "exact" else 0.05  # a Gaussian matrix's flat spectrum is the hardest case
        assert err == pytest.approx(optimal, rel=bound)
        assert layer.method == method


def test_factors_split_singular_values_evenly():
    linear = nn.Linear(10, 12, bias=False)
    layer = TruncatedLinear.from_linear(linear, 4)
    s = torch.linalg.svdvals(linear.weight)[:4]
    assert layer.a.is_contiguous() and layer.b.is_contiguous()  # same layout as a freshly loaded layer
    torch.testing.assert_close(layer.a.norm(dim=1), s.sqrt(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.b.norm(dim=0), s.sqrt(), rtol=1e-4, atol=1e-6)


def test_rank_zero_is_bias_only():
    linear = nn.Linear(6, 5)
    layer = TruncatedLinear.from_linear(linear, 0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), linear.bias.expand(3, 5))
    no_bias = TruncatedLinear.from_linear(nn.Linear(6, 5, bias=False), 0.0)
    assert torch.equal(no_bias(x), torch.zeros(3, 5))


def test_constructor_and_repr():
    layer = TruncatedLinear(30, 20, 0.5, bias=False)
    assert layer.a.shape == (10, 30) and layer.b.shape == (20, 10) and layer.bias is None
    assert "rank=10/20" in repr(layer) and "in_features=30" in repr(layer)
    with pytest.raises(ValueError, match="exceeds the maximum rank 20"):
        TruncatedLinear(30, 20, 21)
    with pytest.raises(ValueError, match="negative"):
        TruncatedLinear(30, 20, -1)
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(20, 30)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        TruncatedLinear.from_linear(nn.Conv1d(3, 3, 1), 1)
    with pytest.raises(ValueError, match="method"):
        TruncatedLinear.from_linear(nn.Linear(3, 3), 1, method="qr")


def test_to_linear_round_trip():
    layer = TruncatedLinear.from_linear(nn.Linear(9, 11), 3)
    dense = layer.to_linear()
    x = torch.randn(4, 9)
    torch.testing.assert_close(dense(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_dtypes_and_moves(dtype, tol):
    linear = nn.Linear(16, 24)
    layer = TruncatedLinear.from_linear(linear, 1.0).to(dtype)
    assert layer.a.dtype == layer.b.dtype == layer.bias.dtype == dtype
    x = torch.randn(2, 3, 16)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 3, 24)
    ref = linear(x)
    assert ((y.float() - ref).norm() / ref.norm()).item() < tol
    assert layer.to("cpu").a.device.type == "cpu"


def test_autograd_and_no_grad():
    layer = TruncatedLinear.from_linear(nn.Linear(8, 6), 3).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lowrank_linear, (x, layer.a, layer.b, layer.bias))
    layer(x).square().sum().backward()
    assert layer.a.grad is not None and layer.b.grad is not None and layer.bias.grad is not None and x.grad is not None
    with torch.no_grad():
        assert not layer(x).requires_grad


def test_bad_inputs_to_forward():
    layer = TruncatedLinear(8, 6, 3)
    with pytest.raises(ValueError, match="x has 7 features"):
        layer(torch.randn(2, 7))
    with pytest.raises(ValueError, match="one dtype"):
        layer(torch.randn(2, 8, dtype=torch.float64))
