"""The three kernels of a CholeskyQR step (kernels/_cholqr_triton.py) against torch.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); marked ``gpu`` they
run natively on CUDA.
"""

import os

import pytest
import torch

from fasttrunc.kernels import svd
from fasttrunc.kernels.svd import STATE_DONE, STATE_FAILED, STATE_SHIFT

DEVICES = [pytest.param("cpu", id="interpreter"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def _device(name):
    if name == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach the Triton kernels only in the interpreter")
    return torch.device(name)


def _buffers(g, coef=None, state=None):
    total, l, _ = g.shape
    coef = torch.full((total,), 1e-3, dtype=torch.float64, device=g.device) if coef is None else coef
    buffers = svd._StepBuffers(total, l, coef, g.device)
    buffers.g.copy_(g)
    if state is not None:
        buffers.state.copy_(state)
    return buffers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m, l", [(97, 70), (33, 13)])
def test_gram_writes_the_upper_tiles_of_unsettled_matrices(device, m, l):
    dev = _device(device)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, m, l, generator=gen).to(dev)
    state = torch.tensor([0, STATE_DONE, STATE_SHIFT], dtype=torch.int32, device=dev)
    g = torch.full((3, l, l), 7.0, device=dev)
    svd._gram_upper(q, g, state)
    ref = q.double().mT @ q.double()
    upper = torch.ones(l, l, dtype=torch.bool, device=dev).triu()
    for i in (0, 2):
        assert ((g[i].double() - ref[i]).abs()[upper].max() / ref[i].abs().max()).item() < 1e-6
    assert torch.equal(g[1], torch.full((l, l), 7.0, device=dev))  # settled: not written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l", [70, 130])
def test_step_factors_inverts_and_flags_as_torch_would(device, l):
    """A random Gram: R of torch's Cholesky, R^-1 to fp64 rounding, hold 0, not converged; an
    orthonormal basis's Gram converges; an indefinite one is held for a shifted step; a settled
    matrix is not touched."""
    dev = _device(device)
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(l + 9, l, generator=gen, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(l + 9, l, generator=gen, dtype=torch.float64))
    indefinite = torch.eye(l, dtype=torch.float64)
    indefinite[l // 2, l // 2] = -1.0
    g = torch.stack([y.T @ y, basis.T @ basis, indefinite, torch.eye(l, dtype=torch.float64)]).float()
    state = torch.tensor([0, 0, 0, STATE_DONE], dtype=torch.int32)
    buffers = _buffers(g.to(dev), state=state.to(dev))
    svd._cholqr_step(buffers, loose=False)
    ref = torch.linalg.cholesky(g[0].double(), upper=True)
    assert ((buffers.r[0].cpu() - ref).abs().max() / ref.abs().max()).item() < 1e-12
    eye = torch.eye(l, dtype=torch.float64)
    assert (buffers.x[0].cpu() @ buffers.r[0].cpu() - eye).abs().max().item() < 1e-10
    assert torch.equal(buffers.rinv[0], buffers.x[0].float())
    assert torch.equal(buffers.x[0], buffers.x[0].triu())
    assert buffers.hold.tolist() == [0, 0, 1, 1]
    assert buffers.state.tolist() == [0, STATE_DONE, STATE_SHIFT, STATE_DONE]


@pytest.mark.parametrize("device", DEVICES)
def test_step_shifts_once_then_fails_and_fails_zero_and_nan(device):
    dev = _device(device)
    l = 9
    indefinite = torch.eye(l)
    indefinite[3, 3] = -1.0
    nan = torch.eye(l)
    nan[2, 5] = float("nan")
    g = torch.stack([indefinite, torch.zeros(l, l), nan]).to(dev)
    buffers = _buffers(g)
    svd._cholqr_step(buffers, loose=False)
    # indefinite: shift next; zero: no positive trace, failed; NaN: a NaN trace, shift next.
    assert buffers.state.tolist() == [STATE_SHIFT, STATE_FAILED, STATE_SHIFT]
    svd._cholqr_step(buffers, loose=False)  # the shift (1e-3 trace) does not rescue a -1 pivot, nor NaN
    assert buffers.state.tolist() == [STATE_FAILED, STATE_FAILED, STATE_FAILED]
    assert buffers.hold.tolist() == [1, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_a_shifted_step_is_not_accepted_loosely(device):
    """After the shifted Gram, a well-conditioned R must not end the loose loop: Q = Y R^-1 need
    not be orthonormal then. The same Gram factored plain is accepted loosely."""
    dev = _device(device)
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(40, 9, generator=gen, dtype=torch.float64)
    g = (y.T @ y).float().expand(2, 9, 9).contiguous().to(dev)
    state = torch.tensor([STATE_SHIFT, 0], dtype=torch.int32, device=dev)
    buffers = _buffers(g, state=state)
    svd._cholqr_step(buffers, loose=True)
    assert buffers.hold.tolist() == [0, 0]
    assert buffers.state.tolist() == [0, STATE_DONE]
    shift = 1e-3 * torch.trace(y.T @ y)
    ref = torch.linalg.cholesky(g[0].double().cpu() + shift * torch.eye(9, dtype=torch.float64), upper=True)
    assert (buffers.r[0].cpu() - ref).abs().max().item() < 1e-9 * ref.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m, l", [(150, 70), (65, 130), (5, 3)])
def test_in_place_update_matches_the_product_and_holds(device, m, l):
    """Several column tiles (l > 64): a left-to-right walk would read columns it already replaced."""
    dev = _device(device)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, m, l, generator=gen).to(dev)
    rinv = torch.randn(2, l, l, generator=gen).triu().to(dev)
    ref = (q.double() @ rinv.double()).float()
    held = q[1].clone()
    svd._update_in_place(q, rinv, torch.tensor([0, 1], dtype=torch.uint8, device=dev))
    assert ((q[0].double() - ref[0].double()).norm() / ref[0].double().norm()).item() < 1e-6
    assert torch.equal(q[1], held)


@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_qr_ex_leaves_its_input_alone(device):
    dev = _device(device)
    y = torch.randn(2, 30, 7, device=dev)
    before = y.clone()
    q, r, failed = svd.cholesky_qr_ex(y)
    assert torch.equal(y, before) and not failed.any()
    assert ((q.double() @ r - y.double()).norm() / y.double().norm()).item() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_loose_test_sums_the_inverse_over_its_column_blocks(device):
    """l = 130: three column blocks of the inverse add their |R^-1|_F^2 and the last decides:
    kappa_F(R) of 2e2 is accepted loosely, 1e6 is not (nor strictly); the sums and tickets are
    left at zero for the next step."""
    dev = _device(device)
    gen = torch.Generator().manual_seed(5)
    l = 130
    basis, _ = torch.linalg.qr(torch.randn(l, l, generator=gen, dtype=torch.float64))
    mild = basis * torch.linspace(1.0, 0.1, l, dtype=torch.float64)  # kappa_2 = 10
    ill = basis * torch.logspace(0, -3, l, dtype=torch.float64)  # kappa_2 = 1e3
    g = torch.stack([mild.T @ mild, ill.T @ ill]).float().to(dev)
    for loose, expect in ((True, [STATE_DONE, 0]), (False, [0, 0])):
        buffers = _buffers(g)
        svd._cholqr_step(buffers, loose=loose)
        r = buffers.r.cpu()
        kappa = torch.linalg.matrix_norm(r) * torch.linalg.matrix_norm(torch.linalg.inv(r))
        assert kappa[0] < 2.0**12 < kappa[1]
        assert buffers.state.tolist() == expect
        assert not buffers.sums.any() and not buffers.tickets.any()
