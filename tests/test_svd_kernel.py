"""Each Triton kernel of kernels/svd.py against its torch oracle, on small odd shapes.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); the same tests
run natively on CUDA (marked ``gpu``; FASTTRUNC_TEST_NATIVE=1 turns the interpreter off there).
"""

import os

import pytest
import torch
import triton
import triton.language as tl

from fasttrunc.kernels._svd_triton import split_tf32
from fasttrunc.kernels.svd import (
    batched_matmul,
    batched_matmul_reference,
    cholesky_qr,
    jacobi_svd,
    randomized_svd_reference,
    randomized_svd_triton,
    randomized_svd_triton_many,
)


def _device(name):
    if name == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach the Triton kernels only in the interpreter")
    return torch.device(name)


DEVICES = [pytest.param("cpu", id="interpreter"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def orthonormality(q):
    eye = torch.eye(q.shape[-1], dtype=torch.float64, device=q.device)
    return (q.double().mT @ q.double() - eye).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision, bound", [("ieee", 1e-6), ("tf32x3", 1e-5), ("tf32", 5e-3)])
@pytest.mark.parametrize("shape", [(3, 37, 29, 19), (1, 70, 5, 67), (2, 1, 33, 1)])
def test_batched_matmul_fp32_matches_reference(device, precision, bound, shape):
    dev = _device(device)
    b, m, k, n = shape
    a = torch.randn(b, m, k, device=dev)
    x = torch.randn(b, k, n, device=dev)
    assert rel_err(batched_matmul(a, x, precision), batched_matmul_reference(a, x)) < bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, bound", [(torch.float16, 1e-6), pytest.param(torch.bfloat16, 1e-6, marks=pytest.mark.gpu)]
)
def test_batched_matmul_reads_half_weights_as_stored_through_a_transposed_view(device, dtype, bound):
    dev = _device(device)
    if dtype == torch.bfloat16 and dev.type == "cpu":
        pytest.skip("the interpreter's bf16 path is not trusted; checked on CUDA")
    w = torch.randn(2, 45, 31, device=dev).to(dtype)
    x = torch.randn(2, 45, 11, device=dev)
    out = batched_matmul(w.mT, x)  # W^T X without copying W: the kernel follows the strides
    assert out.dtype == torch.float32
    assert rel_err(out, batched_matmul_reference(w.mT, x)) < bound


def test_batched_matmul_rejects_bad_operands():
    a, x = torch.randn(2, 5, 4), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="needs a"):
        batched_matmul(a, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="float32"):
        batched_matmul(a, x.double())
    with pytest.raises(ValueError, match="precision 'fp8'"):
        batched_matmul(a, x, "fp8")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l", [1, 6, 37, 70])
def test_batched_cholesky_matches_torch(device, l):
    from fasttrunc.kernels.svd import batched_cholesky

    dev = _device(device)
    a = torch.randn(3, l + 4, l, dtype=torch.float64, generator=torch.Generator().manual_seed(l))
    g = (a.mT @ a).to(dev)
    r, info = batched_cholesky(g)
    ref = torch.linalg.cholesky(g, upper=True)
    assert info.tolist() == [0, 0, 0]
    assert (r - ref).abs().max().item() < 1e-12 * ref.abs().max().item()
    assert torch.equal(r.tril(-1), torch.zeros_like(r))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_cholesky_reports_the_first_bad_pivot_as_torch_does(device):
    """Indefinite, NaN and zero matrices: the same info as torch.linalg.cholesky_ex, nothing raised."""
    from fasttrunc.kernels.svd import batched_cholesky

    dev = _device(device)
    g = torch.eye(5, dtype=torch.float64).repeat(4, 1, 1)
    g[0, 2, 2] = -1.0
    g[1, 3, 3] = float("nan")
    g[2] = 0.0
    g[3, 0, 1] = g[3, 1, 0] = 2.0  # indefinite 2 x 2 block: the second pivot is 1 - 4
    _, info = batched_cholesky(g.to(dev))
    assert info.tolist() == torch.linalg.cholesky_ex(g, upper=True)[1].tolist() == [3, 4, 1, 2]
    with pytest.raises(ValueError, match=r"^batched_cholesky needs float64 input; got torch.float32$"):
        batched_cholesky(g.float())
    with pytest.raises(
        ValueError, match=r"^batched_cholesky needs a batch of square matrices \(B, l, l\); got \(5, 5\)$"
    ):
        batched_cholesky(g[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l", [1, 6, 13])
def test_jacobi_svd_matches_torch(device, l):
    dev = _device(device)
    r = torch.randn(2, l, l, device=dev)
    u, s, v, sweeps = jacobi_svd(r)
    ref = torch.linalg.svdvals(r.double())
    assert (s.double() - ref).abs().max().item() <= 1e-5 * ref.max().item()
    assert torch.all(s[:, :-1] >= s[:, 1:])
    assert orthonormality(u) < 1e-4 and orthonormality(v) < 1e-5
    recon = u.double() @ torch.diag_embed(s.double()) @ v.double().mT
    assert rel_err(recon, r) < 1e-5
    assert sweeps.max().item() < 30, "Jacobi did not converge within its sweep limit"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_sweeps", [3, 30])
@pytest.mark.parametrize("replay", [True, False])
def test_jacobi_replays_each_matrix_own_sweeps_on_v(device, max_sweeps, replay, monkeypatch):
    """The Jacobi kernel logs rotations two sweeps a launch and the replay applies them to V: a
    batch whose matrices stop after different sweep counts (a diagonal one after one, an odd
    max_sweeps cutting a launch short) still gets V = the product of its own rotations: R V = U S
    with V orthonormal to rounding, as with one kernel doing both. Without the replay (the path
    past 512 padded columns, forced here by lowering the bound) the X programs rotate V."""
    import fasttrunc.kernels.svd as svd_module

    if not replay:
        monkeypatch.setattr(svd_module, "_REPLAY_MAX_COLUMNS", 16)
    dev = _device(device)
    gen = torch.Generator().manual_seed(6)
    l = 21
    r = torch.stack([torch.diag(torch.linspace(3.0, 1.0, l)), torch.randn(l, l, generator=gen)]).to(dev)
    u, s, v, sweeps = jacobi_svd(r, max_sweeps=max_sweeps)
    assert sweeps[0].item() == 1
    assert sweeps[1].item() == 3 if max_sweeps == 3 else 3 < sweeps[1].item() < max_sweeps
    eye = torch.eye(l, dtype=torch.float64, device=dev)
    assert (v.double().mT @ v.double() - eye).abs().max().item() < 1e-5
    for i in range(2):
        rv = r[i].double() @ v[i].double()
        assert (rv - u[i].double() * s[i].double()).abs().max().item() < 1e-5 * s[i].max().item()
    if max_sweeps == 30:
        ref = torch.linalg.svdvals(r.double())
        assert (s.double() - ref).abs().max().item() < 1e-5 * ref.max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_jacobi_svd_rank_deficient_and_zero_give_no_nan(device):
    dev = _device(device)
    deficient = torch.randn(7, 2, device=dev) @ torch.randn(2, 7, device=dev)
    r = torch.stack([deficient, torch.zeros(7, 7, device=dev)])
    u, s, v, _ = jacobi_svd(r)
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(v).all()
    assert s[1].abs().max().item() == 0.0
    assert s[0, 2:].max().item() <= 1e-5 * s[0, 0].item()
    recon = u.double() @ torch.diag_embed(s.double()) @ v.double().mT
    assert (recon - r.double()).abs().max().item() < 1e-5
    assert orthonormality(v) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loose, bound", [(False, 1e-5), (True, 1e-3)])
@pytest.mark.parametrize("shape", [(3, 41, 13), (1, 17, 17)])
def test_cholesky_qr_is_orthonormal_and_exact(device, loose, bound, shape):
    dev = _device(device)
    y = torch.randn(*shape, device=dev)
    q, r = cholesky_qr(y, loose=loose)
    assert q.dtype == torch.float32 and r.dtype == torch.float64
    assert orthonormality(q) < bound
    assert torch.equal(r, r.triu())
    assert rel_err(q.double() @ r, y) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_qr_survives_ill_conditioning_zeros_and_rank_deficiency(device):
    dev = _device(device)
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(40, 9, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    ill = (basis * torch.logspace(0, -6, 9, dtype=torch.float64)) @ right  # cond 1e6: plain CholeskyQR2 breaks
    deficient = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 9, generator=g, dtype=torch.float64
    )
    y = torch.stack([ill, torch.zeros(40, 9, dtype=torch.float64), deficient]).float().to(dev)
    from fasttrunc.kernels.svd import cholesky_qr_ex

    q_ex, r_ex, failed = cholesky_qr_ex(y[:1])  # the shifted Gram, in the step after the plain one failed
    assert not failed.any() and orthonormality(q_ex) < 1e-4
    assert (q_ex[0].double() @ r_ex[0] - y[0].double()).abs().max().item() < 1e-5
    q, r = cholesky_qr(y)
    assert torch.isfinite(q).all() and torch.isfinite(r).all()
    assert orthonormality(q) < 1e-4
    for i in range(3):
        assert (q[i].double() @ r[i] - y[i].double()).abs().max().item() < 1e-5 * max(1.0, y[i].abs().max().item())


def _spectrum_matrix(m, n, sigma, batch, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(batch, m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(batch, n, k, generator=g, dtype=torch.float64))
    return (u * sigma) @ v.mT


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m, n", [(53, 31), (29, 47)])
def test_randomized_svd_triton_matches_the_reference(device, m, n):
    dev = _device(device)
    sigma = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    w64 = _spectrum_matrix(m, n, sigma, 2, seed=1)
    w = w64.float().to(dev)
    k, oversample, n_iter = 4, 5, 2
    u, s, vh = randomized_svd_triton(
        w, k, n_iter=n_iter, oversample=oversample, generator=torch.Generator().manual_seed(3)
    )
    ur, sr, vhr = randomized_svd_reference(
        w, k, n_iter=n_iter, oversample=oversample, generator=torch.Generator().manual_seed(3)
    )
    assert u.shape == (2, m, k) and s.shape == (2, k) and vh.shape == (2, k, n)
    # Same sketch, same subspace: singular values and the projector agree to fp32 rounding.
    assert (s - sr).abs().max().item() < 1e-5
    assert rel_err(u @ torch.diag_embed(s) @ vh, ur @ torch.diag_embed(sr) @ vhr) < 1e-4
    assert orthonormality(u) < 1e-4 and orthonormality(vh.mT) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_triton_reads_fp16_weights(device):
    dev = _device(device)
    sigma = 0.7 ** torch.arange(31, dtype=torch.float64)
    w16 = _spectrum_matrix(45, 31, sigma, 1, seed=2).half().to(dev)
    u, s, vh = randomized_svd_triton(w16, 3, n_iter=2, oversample=4, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.svdvals(w16.double())
    assert (s.double() - exact[:, :3]).abs().max().item() < 1e-5
    assert orthonormality(u) < 1e-4 and orthonormality(vh.mT) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_batches_of_different_shapes_share_the_small_svd_and_match_one_by_one(device):
    dev = _device(device)
    ws = [torch.randn(2, 40, 23, device=dev), torch.randn(1, 23, 40, device=dev), torch.randn(1, 31, 29, device=dev)]
    ks, oversamples = [3, 3, 3], [4, 4, 3]  # the first two share l = 7 and one Jacobi launch
    together = randomized_svd_triton_many(
        ws, ks, n_iter=1, oversamples=oversamples, generator=torch.Generator().manual_seed(0)
    )
    gen = torch.Generator().manual_seed(0)
    for w, k, os_, (u, s, vh) in zip(ws, ks, oversamples, together):
        u1, s1, vh1 = randomized_svd_triton(w, k, n_iter=1, oversample=os_, generator=gen)
        assert u.shape == u1.shape and vh.shape == vh1.shape
        torch.testing.assert_close(s, s1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, u1 @ torch.diag_embed(s1) @ vh1, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ hazards (issue 15) --------


@pytest.mark.parametrize("device", DEVICES)
def test_jacobi_floor_is_per_matrix(device):
    """Hazard: one floor for the whole batch, taken from its largest matrix, left a small matrix
    batched beside a large one unrotated. Each matrix keeps its own floor."""
    dev = _device(device)
    g = torch.Generator().manual_seed(4)
    small = torch.randn(9, 9, generator=g)
    big = 1e6 * torch.randn(9, 9, generator=g)
    u, s, v, _ = jacobi_svd(torch.stack([big, small]).to(dev))
    ref = torch.linalg.svdvals(small.double())
    assert (s[1].double().cpu() - ref).abs().max().item() <= 1e-5 * ref.max().item()
    assert orthonormality(u[1]) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_unconverged_jacobi_matrices_are_solved_again(device):
    """Hazard: the sweep count Jacobi returns was ignored. With one sweep allowed, no matrix
    converges; the result must still be the SVD (those matrices are solved again)."""
    dev = _device(device)
    sigma = 1.0 / torch.arange(1, 32, dtype=torch.float64)
    w = _spectrum_matrix(45, 31, sigma, 2, seed=5).float().to(dev)
    _, _, _, sweeps = jacobi_svd(torch.randn(2, 9, 9, device=dev), max_sweeps=1)
    assert (sweeps >= 1).all()
    kwargs = {"n_iter": 2, "oversample": 5}
    u, s, vh = randomized_svd_triton(w, 4, generator=torch.Generator().manual_seed(1), jacobi_max_sweeps=1, **kwargs)
    u2, s2, vh2 = randomized_svd_triton(w, 4, generator=torch.Generator().manual_seed(1), **kwargs)
    assert (s - s2).abs().max().item() < 1e-5
    assert rel_err(u @ torch.diag_embed(s) @ vh, u2 @ torch.diag_embed(s2) @ vh2) < 1e-4
    assert orthonormality(u) < 1e-4


@pytest.mark.parametrize("loose", [False, True])
def test_cholesky_qr_loop_never_waits_for_the_device(monkeypatch, loose):
    """Hazard: `bool(t.any())` inside the CholeskyQR loop synced the host every step. Only the
    Householder fallback after the loop may read a device value (once)."""
    dev = _device("cpu")
    y = torch.randn(2, 41, 13, device=dev)
    reads = []
    real_bool = torch.Tensor.__bool__
    real_item = torch.Tensor.item

    def counting_bool(t):
        reads.append("bool")
        return real_bool(t)

    def counting_item(t):
        reads.append("item")
        return real_item(t)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    q, r = cholesky_qr(y, loose=loose)
    monkeypatch.undo()
    assert len(reads) <= 1, reads
    assert orthonormality(q) < (1e-3 if loose else 1e-5)
    assert rel_err(q.double() @ r, y) < 1e-6


def test_svd_launches_run_under_the_tensors_device(monkeypatch):
    """Hazard: launches went to the current device; the bmm and Jacobi launches run inside the guard."""
    import fasttrunc.kernels.svd as svd_module

    _device("cpu")
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(svd_module, "_device_guard", Guard)
    a, x = torch.randn(2, 5, 4), torch.randn(2, 4, 3)
    batched_matmul(a, x)
    jacobi_svd(torch.randn(1, 5, 5))
    assert entered == [a.device, a.device]
    monkeypatch.undo()
    guard = svd_module._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_fp32_grade_products_take_3xtf32_on_tensor_core_gpus(monkeypatch):
    """Precision "fp32" means 3xTF32 where tensor cores do TF32 (sm_80+), IEEE FMA elsewhere and off CUDA."""
    import fasttrunc.kernels.svd as svd_module

    assert svd_module.dot_precision("fp32", torch.device("cpu")) == "ieee"
    assert svd_module.dot_precision("tf32", torch.device("cuda", 0)) == "tf32"
    monkeypatch.setattr(svd_module, "_has_tf32", lambda device: True)
    assert svd_module.dot_precision("fp32", torch.device("cuda", 0)) == "tf32x3"
    monkeypatch.setattr(svd_module, "_has_tf32", lambda device: False)
    assert svd_module.dot_precision("fp32", torch.device("cuda", 0)) == "ieee"
    assert svd_module.PROJECTION_PRECISION == "fp32"


class _NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every op that copies a device value to the host (what a CUDA graph cannot hold)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in self.SYNCING or any(getattr(i, "dtype", None) == torch.bool for i in indices or ()):
            raise AssertionError(f"host read: aten.{name}")
        return func(*args, **(kwargs or {}))


def _awkward_batch():
    """A sound matrix, an all-zero one (its CholeskyQR fails) and a rank-2 one (its sketch is rank 2
    up to fp32 rounding, which the shifted CholeskyQR may or may not turn into a basis)."""
    sigma = 1.0 / torch.arange(1, 31, dtype=torch.float64)
    sound = _spectrum_matrix(45, 30, sigma, 1, seed=7)[0]
    low = _spectrum_matrix(45, 30, torch.tensor([3.0, 1.0] + [0.0] * 28, dtype=torch.float64), 1, seed=8)[0]
    return torch.stack([sound, torch.zeros(45, 30, dtype=torch.float64), low]).float()


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_ex_never_reads_the_device_and_flags_what_failed(device):
    """Hazard: host syncs in CholeskyQR's repair and Jacobi's fallback kept the rSVD out of CUDA
    graphs. The _ex form reads nothing back (every op checked); it flags the matrices to redo."""
    from fasttrunc.kernels.svd import INFO_BASIS, INFO_JACOBI, randomized_svd_triton_many_ex

    dev = _device(device)
    w = _awkward_batch().to(dev)
    gen = torch.Generator(dev).manual_seed(3)
    with _NoHostReads():
        (u, s, vh, info), (_, _, _, info1) = randomized_svd_triton_many_ex(
            [w, w[:1]], [4, 4], n_iter=2, oversamples=[5, 5], generator=gen, jacobi_max_sweeps=1
        )
        (_, _, _, info2) = randomized_svd_triton_many_ex([w], [4], n_iter=2, oversamples=[5], generator=gen)[0]
    assert info.tolist()[:2] == [INFO_JACOBI, INFO_BASIS | INFO_JACOBI] and info[2].item() & INFO_JACOBI
    assert info1.tolist() == [INFO_JACOBI] and info2.tolist()[:2] == [0, INFO_BASIS]
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()
    with pytest.raises(ValueError, match="one k and one oversample per batch: got 2 batches, 2 ks, 1 oversamples"):
        randomized_svd_triton_many_ex([w, w], [4, 4], n_iter=2, oversamples=[5])
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        randomized_svd_triton(w, 4, n_iter=2, oversample=5)  # the repairing form reads the info once


@pytest.mark.parametrize("device", DEVICES)
def test_flagged_matrices_are_solved_again_from_their_own_sketch(device):
    """The plain form redoes exactly the flagged matrices: the sound one is bitwise the _ex result,
    the zero and rank-2 ones come out exact with an orthonormal basis (Householder repair)."""
    from fasttrunc.kernels.svd import randomized_svd_triton_many_ex

    dev = _device(device)
    w = _awkward_batch().to(dev)
    u, s, vh = randomized_svd_triton(w, 4, n_iter=2, oversample=5, generator=torch.Generator(dev).manual_seed(3))
    ue, se, vhe, info = randomized_svd_triton_many_ex(
        [w], [4], n_iter=2, oversamples=[5], generator=torch.Generator(dev).manual_seed(3)
    )[0]
    assert info[0].item() == 0 and torch.equal(u[0], ue[0]) and torch.equal(s[0], se[0])
    assert torch.equal(vh[0], vhe[0])
    assert s[1].abs().max().item() == 0.0 and (u[1] @ torch.diag(s[1]) @ vh[1]).abs().max().item() == 0.0
    assert rel_err(u[2] @ torch.diag(s[2]) @ vh[2], w[2]) < 1e-5
    assert orthonormality(u[2][:, :2]) < 1e-5 and orthonormality(vh[2][:2].mT) < 1e-5


def test_a_cpu_generator_is_refused_inside_a_cuda_graph_capture(monkeypatch):
    """Its draw would be frozen into the graph (and the copy from pageable memory cannot be captured)."""
    import fasttrunc.kernels.svd as svd_module

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    svd_module._refuse_frozen_draw(cuda, torch.Generator())  # eager: the draw is copied over
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    svd_module._refuse_frozen_draw(cuda, None)
    svd_module._refuse_frozen_draw(torch.device("cpu"), torch.Generator())
    with pytest.raises(ValueError, match=r"^generator on cpu cannot feed a CUDA graph capture on cuda:0: pass"):
        svd_module._refuse_frozen_draw(cuda, torch.Generator())


@pytest.mark.gpu
def test_randomized_svd_ex_replays_in_a_cuda_graph():
    """Captured once, replayed on new weights copied into the captured input: equal to eager."""
    from fasttrunc.kernels.svd import randomized_svd_triton_many_ex

    dev = _device("cuda")
    sigma = 1.0 / torch.arange(1, 41, dtype=torch.float64)
    w = _spectrum_matrix(96, 40, sigma, 3, seed=9).float().to(dev)
    fresh = _spectrum_matrix(96, 40, sigma, 3, seed=10).float().to(dev)
    kwargs = {"n_iter": 2, "oversamples": [8]}
    randomized_svd_triton_many_ex([w], [6], **kwargs)  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        randomized_svd_triton_many_ex([w], [6], **kwargs)
        with torch.cuda.graph(graph, stream=stream):  # the default CUDA generator: capture-safe
            u, s, vh, info = randomized_svd_triton_many_ex([w], [6], **kwargs)[0]
    torch.cuda.current_stream().wait_stream(stream)
    w.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert (info == 0).all()
    ref = torch.linalg.svdvals(fresh.double())
    assert (s.double() - ref[:, :6]).abs().max().item() < 1e-3 * ref.max().item()
    optimal = ref[:, 6:].square().sum(-1).sqrt()
    err = torch.linalg.matrix_norm((u @ torch.diag_embed(s) @ vh).double() - fresh.double())
    assert (err <= 1.05 * optimal).all(), (err, optimal)
    assert orthonormality(u) < 1e-4


def _count_choleskys(monkeypatch):
    """The batch size of every _cholqr_step launch (one fp64 Cholesky and inverse per matrix) from
    here on (the launches still run)."""
    import fasttrunc.kernels.svd as svd_module

    factored = []
    real_step = svd_module._cholqr_step

    def counting_step(buffers, loose):
        factored.append(buffers.state.shape[0])
        return real_step(buffers, loose)

    monkeypatch.setattr(svd_module, "_cholqr_step", counting_step)
    return factored


@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_qr_skips_the_work_of_settled_matrices(device, monkeypatch):
    """Converged matrices cost no Gram and no update in the fixed later steps: an orthonormal y is
    settled after one step, a random one after two (CholeskyQR2), and the last two steps skip both.
    The kernels read the flags on the device; recorded here at each launch."""
    import fasttrunc.kernels.svd as svd_module

    dev = _device(device)
    g = torch.Generator().manual_seed(11)
    orthonormal, _ = torch.linalg.qr(torch.randn(41, 13, generator=g, dtype=torch.float64))
    y = torch.stack([orthonormal.float(), torch.randn(41, 13, generator=g)]).to(dev)
    flags = []
    real_gram, real_update = svd_module._gram_upper, svd_module._update_in_place

    def recording_gram(q, gram, state):
        flags.append(("gram", ((state & 3) != 0).tolist()))
        return real_gram(q, gram, state)

    def recording_update(q, rinv, hold):
        flags.append(("update", (hold != 0).tolist()))
        return real_update(q, rinv, hold)

    factored = _count_choleskys(monkeypatch)
    monkeypatch.setattr(svd_module, "_gram_upper", recording_gram)
    monkeypatch.setattr(svd_module, "_update_in_place", recording_update)
    q, r, failed = svd_module.cholesky_qr_ex(y)
    monkeypatch.undo()
    assert factored == [2, 2, 2, 2]  # one launch a step for the whole batch
    per_step = [[False, False], [True, False], [True, True], [True, True]]
    assert flags == [(kind, step) for step in per_step for kind in ("gram", "update")]
    assert not failed.any() and orthonormality(q) < 1e-5 and rel_err(q.double() @ r, y) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_batches_of_one_l_share_each_cholesky_launch(device, monkeypatch):
    """Two shapes with the same l go through the range finder in lock step: every CholeskyQR step
    factors the Grams of both in one launch (6 factorizations x 4 steps at n_iter=2), and the
    results equal one call per batch."""
    import fasttrunc.kernels.svd as svd_module

    dev = _device(device)
    gen = torch.Generator().manual_seed(12)
    ws = [torch.randn(2, 30, 21, generator=gen).to(dev), torch.randn(1, 19, 26, generator=gen).to(dev)]
    kwargs = {"n_iter": 2, "oversamples": [4, 4]}
    factored = _count_choleskys(monkeypatch)
    together = svd_module.randomized_svd_triton_many_ex(ws, [5, 5], generator=gen.manual_seed(1), **kwargs)
    assert factored == [3] * 24
    monkeypatch.undo()
    first = svd_module.randomized_svd_triton_many_ex(
        ws[:1], [5], n_iter=2, oversamples=[4], generator=gen.manual_seed(1)
    )
    for a, b in zip(together[0], first[0]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _round_tf32(x):
    """x rounded to tf32 as cvt.rna.tf32.f32 does: 10 mantissa bits, ties away from zero."""
    return ((x.contiguous().view(torch.int32) + 0x1000) & -8192).view(torch.float32)


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    hi, lo = split_tf32(tl.load(x_ptr + offs))
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


def test_split_tf32_is_exact_with_a_tf32_hi_half():
    """The 2xTF32 split: hi holds tf32's bits only (the low 13 mantissa bits zero), is x rounded to
    nearest, and hi + lo == x exactly with |lo| <= 2^-11 |x|."""
    _device("cpu")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=gen) * torch.logspace(-30, 30, 4096).float()
    x[:4] = torch.tensor([0.0, -0.0, 1.0 + 2.0**-11, -(1.0 + 2.0**-11)])  # exact ties round away from zero
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, N=4096)
    assert (hi.view(torch.int32) & 0x1FFF).eq(0).all()
    assert torch.equal(hi, _round_tf32(x)) and torch.equal(hi[2:4], torch.tensor([1.0 + 2.0**-10, -(1.0 + 2.0**-10)]))
    assert torch.equal(hi + lo, x)
    assert (lo.abs() <= 2.0**-11 * x.abs()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 45, 19), (1, 70, 33, 67), (2, 130, 29, 75)])
def test_fp32_grade_products_of_half_weights_take_2xtf32(device, dtype, shape):
    """3xTF32 of an fp16 / bf16 A runs as two tf32 products of the split x (A is exact in tf32), to
    fp32 accuracy: the bound is far below what x rounded to tf32 once (the hi half alone) gives."""
    import fasttrunc.kernels.svd as svd_module

    dev = _device(device)
    assert svd_module.kernel_precision("tf32x3", dtype, dev) == "tf32x2"
    b, m, k, n = shape
    gen = torch.Generator().manual_seed(m)
    a = torch.randn(b, k, m, generator=gen).to(dtype).to(dev).mT  # a transposed view, as W^T Q reads it
    x = torch.randn(b, k, n, generator=gen).to(dev)
    ref = batched_matmul_reference(a, x)
    assert rel_err(batched_matmul(a, x, "tf32x3"), ref) < 1e-6
    assert rel_err(batched_matmul_reference(a, _round_tf32(x.cpu()).to(dev)), ref) > 2e-5


def test_kernel_precision_takes_2xtf32_for_half_weights_on_tensor_core_gpus(monkeypatch):
    import fasttrunc.kernels.svd as svd_module

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(svd_module, "_has_tf32", lambda device: True)
    assert svd_module.kernel_precision("fp32", torch.float16, cuda) == "tf32x2"
    assert svd_module.kernel_precision("fp32", torch.bfloat16, cuda) == "tf32x2"
    assert svd_module.kernel_precision("fp32", torch.float32, cuda) == "tf32x3"
    assert svd_module.kernel_precision("tf32", torch.float16, cuda) == "tf32"
    assert svd_module.kernel_precision("fp16", torch.float16, cuda) == "fp16"
    assert svd_module.kernel_precision("fp32", torch.float16, torch.device("cpu")) == "ieee"
    monkeypatch.setattr(svd_module, "_has_tf32", lambda device: False)
    assert svd_module.kernel_precision("fp32", torch.float16, cuda) == "ieee"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 37, 45, 19), (1, 130, 33, 75)])
def test_fp16_products_round_x_to_fp16(device, shape):
    """Precision "fp16": x rounded to fp16, products of an fp16 A accumulated in fp32."""
    dev = _device(device)
    b, m, k, n = shape
    gen = torch.Generator().manual_seed(k)
    a = torch.randn(b, m, k, generator=gen).half().to(dev)
    x = torch.randn(b, k, n, generator=gen).to(dev)
    out = batched_matmul(a, x, "fp16")
    assert rel_err(out, batched_matmul_reference(a, x.half().float())) < 1e-6
    assert 1e-5 < rel_err(out, batched_matmul_reference(a, x)) < 1e-3


def test_fp16_products_need_fp16_weights():
    x = torch.randn(2, 4, 3)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"^precision 'fp16' needs a in float16; got {dtype}$"):
            batched_matmul(torch.randn(2, 5, 4).to(dtype), x, "fp16")
    with pytest.raises(
        ValueError, match=r"^precision 'fp8' is not a dot precision; allowed: ieee, tf32, tf32x3, fp32, fp16$"
    ):
        batched_matmul(torch.randn(2, 5, 4).half(), x, "fp8")


def test_pass_tiles_follow_precision_and_width():
    """Narrow products keep 64 x 64 tiles over 4 warps; the passes over W take 128 rows over 8
    warps, 64 columns where that pads l less for the MMA-bound ones."""
    import fasttrunc.kernels.svd as svd_module

    tiles = svd_module.bmm_tiles
    assert tiles(64, "tf32x3", 4) == (64, 64, 4)
    assert tiles(266, "ieee", 4) == (64, 64, 4)  # 64 x 128 spilled under triton 3.6
    assert tiles(266, "tf32x3", 4) == (128, 64, 8)  # 320 columns instead of 384
    assert tiles(266, "tf32x2", 2) == (128, 64, 8)
    assert tiles(266, "tf32", 2) == (128, 64, 8)
    assert tiles(266, "tf32", 4) == (128, 128, 8)  # memory-bound: A read 3 times, not 5
    assert tiles(266, "fp16", 2) == (128, 128, 8)
    assert tiles(74, "tf32x3", 4) == (128, 128, 8)  # both pad to 128 columns


@pytest.mark.parametrize("device", DEVICES)
def test_rsvd_of_fp16_weights_steers_the_range_in_fp16(device, monkeypatch):
    """Range-steering passes over fp16 weights run as fp16 MMAs; the last W Z and W^T Q stay
    fp32-grade; fp32 and bf16 weights keep tf32 range passes."""
    import fasttrunc.kernels.svd as svd_module

    dev = _device(device)
    assert svd_module._pass_precision("tf32", torch.bfloat16) == "tf32"
    assert svd_module._pass_precision("tf32", torch.float32) == "tf32"
    assert svd_module._pass_precision("fp32", torch.float16) == "fp32"
    seen = []
    real = svd_module.batched_matmul

    def recording(a, x, precision="fp32", **kwargs):
        if a.dtype == torch.float16:
            seen.append(precision)
        return real(a, x, precision, **kwargs)

    monkeypatch.setattr(svd_module, "batched_matmul", recording)
    sigma = 0.7 ** torch.arange(31, dtype=torch.float64)
    w16 = _spectrum_matrix(45, 31, sigma, 1, seed=2).half().to(dev)
    u, s, vh = randomized_svd_triton(w16, 3, n_iter=2, oversample=4, generator=torch.Generator().manual_seed(0))
    assert seen == ["fp16"] * 4 + ["fp32"] * 2  # sketch, 3 steering passes; the last W Z, W^T Q
    exact = torch.linalg.svdvals(w16.double())
    assert (s.double() - exact[:, :3]).abs().max().item() < 1e-5
