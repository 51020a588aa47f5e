"""Batched randomized truncated SVD.

Layers of this file (DESIGN.md section 4):
1. Triton kernels  -- in ``_svd_triton`` (imported on the first launch): ``bmm_kernel``
                      (batched ``A @ X`` reading ``A`` as stored, any strides),
                      ``cholesky_kernel`` (fp64 Cholesky of a small matrix, one program per
                      matrix) and ``jacobi_kernel`` (one-sided Jacobi SVD of a small square
                      matrix, one program per matrix, every sweep inside one launch); in
                      ``_cholqr_triton``, the four kernels of a CholeskyQR step (the Gram's upper
                      tiles, the fp64 factorization with the per-matrix state, the inverse, the
                      in-place update);
2. launchers       -- :func:`batched_matmul`, :func:`batched_cholesky`, :func:`jacobi_svd`,
                      :func:`_gram_upper`, :func:`_cholqr_step`, :func:`_update_in_place`, and the
                      pieces built from them: :func:`cholesky_qr` and :func:`randomized_svd_triton`;
3. torch reference -- :func:`randomized_svd_reference` (Householder QR, ``torch.linalg.svd``),
                      the oracle in tests and the CPU path; :func:`batched_matmul_reference`;
4. no autograd: nothing here needs gradients;
5. public functional -- :func:`randomized_svd`, which dispatches with ``use_triton``.

Both paths run the randomized range finder with power iterations (Halko, Martinsson, Tropp 2011,
algorithms 4.4 and 5.1): sample ``Y = W G`` with a Gaussian ``G`` of ``l = k + oversample``
columns, orthonormalize, alternate ``W^T Q`` / ``W Z`` ``n_iter`` times re-orthonormalizing after
every half step (without it the columns collapse onto the top singular vector in finite
precision), then take the SVD of the small ``l x n`` matrix ``Q^T W``.

The Triton path differs only in how the small problems are solved, so that nothing loops over the
batch (torch's batched QR, SVD and eigh loop per matrix at these sizes, benchmarks/BASELINES.md section 2):
- orthonormalization is CholeskyQR2: Gram ``Y^T Y`` with fp32-grade products (3xTF32 on tensor
  cores, IEEE FMA elsewhere), Cholesky and inverse of the small ``l x l`` Gram in fp64,
  ``Q = Y R^-1`` in place; a fixed number of steps, no host sync inside, every decision taken
  per matrix on the device; a breakdown (indefinite Gram) retries with a shifted Gram (shifted
  CholeskyQR3), and a matrix that still fails (e.g. all zeros) is flagged;
- the final small SVD factors ``B^T = W^T Q = Q2 R`` (CholeskyQR again) and runs a batched
  one-sided Jacobi SVD on the ``l x l`` ``R^T = U_T S V_T^T`` in Triton: ``U = Q U_T``,
  ``Vh = (Q2 V_T)^T``, both orthonormal (``Vh`` to rounding, ``U`` to the Jacobi tolerance);
- nothing reads the device back (:func:`randomized_svd_triton_many_ex`, capturable in a CUDA
  graph) until the ordinary entry points read the flags once at the end and solve the flagged
  matrices again with Householder QR and an fp64 ``torch.linalg.svd`` as repairs.
Weights are read in their stored dtype (fp32, bf16, fp16): the kernels cast tiles to fp32 in
registers, so no fp32 copy of a bf16 model is made.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from fasttrunc.kernels._backend import use_triton

# ---------------------------------------------------------------------------------------------
# 2. Launchers
# ---------------------------------------------------------------------------------------------

# Tiles of the batched product, 32-deep K steps over 4 warps, 64 rows. The N side (l = k +
# oversample = 74..288 columns here) decides how often each tile of A (the weights) is read:
# once per N tile. 128-column tiles read A 3 times at l = 266 instead of 5 with 64 columns, for
# 384 computed columns instead of 320, at the same 3 CTAs per SM for tf32 (sm_90, triton 3.6:
# 168 registers, 72 KB shared, no spills; 3xTF32 246 registers, 2 CTAs; benchmarks/AOT_AUDIT.md).
# Narrow products (l <= 64) keep 64 columns. Untuned on a GPU.
_BLOCK_M, _BLOCK_K, _BMM_WARPS = 64, 32, 4
_BLOCK_N_NARROW, _BLOCK_N_WIDE = 64, 128
# Wide tensor-core products (the passes over W) take 128-row tiles over 8
# warps (two warpgroups of 64 rows): each tile of X is then read from L2 half as often. At 4 warps
# 128-row tiles spill on sm_90 (256-3680 bytes: 3xTF32, 2xTF32, fp16 and tf32 of a half A at
# 128 columns); at 8 warps none does (sm_90, benchmarks/AOT_AUDIT.md: 148-201 registers, 32-96 KB
# shared at l = 266; 3xTF32 of 128 columns, l <= 128, 255 registers). The compute-bound products
# (3xTF32, 2xTF32, tf32 of a half A) take whichever of 64 / 128 columns pads n less (l = 266: 320
# columns, 17% fewer MMAs than 384, for A read 5 times instead of 3); the memory-bound ones (tf32
# of an fp32 A, fp16) keep 128. Chosen by fasttrunc.bench.svd's cost model (estimates, untuned on
# a GPU): at 24 x 8192 x 2048 and 24 x 2048 x 8192, l = 266, 3xTF32 6.26 ms against 7.51 at
# 64 x 128, tf32 2.82 against 3.79, 2xTF32 4.17 against 5.01, fp16 1.96 against 2.92.
_BLOCK_M_WIDE, _BMM_WARPS_WIDE = 128, 8
_PADDING_BOUND = ("tf32x3", "tf32x2")


def bmm_block_n(n: int) -> int:
    """The widest N tile of :func:`batched_matmul` for ``n`` columns."""
    return _BLOCK_N_NARROW if n <= _BLOCK_N_NARROW else _BLOCK_N_WIDE


def bmm_tiles(n: int, precision: str, a_itemsize: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of one :func:`batched_matmul` launch of ``n`` columns.

    ``precision`` is the kernel's (:func:`kernel_precision`), ``a_itemsize`` the bytes of one
    element of ``a``. Narrow products (``n <= 64``) and IEEE FMA keep 64 x 64 tiles over 4 warps
    (IEEE's 64 x 128 spilled 80 bytes under triton 3.6, sm_90); the passes over W take 128-row
    tiles over 8 warps, 64 or 128 columns (see ``_BLOCK_M_WIDE``).
    """
    block_n = bmm_block_n(n)
    if block_n == _BLOCK_N_NARROW or precision == "ieee":
        return _BLOCK_M, _BLOCK_N_NARROW, _BMM_WARPS
    if precision in _PADDING_BOUND or (precision == "tf32" and a_itemsize < 4):
        if _cdiv(n, _BLOCK_N_NARROW) * _BLOCK_N_NARROW < _cdiv(n, _BLOCK_N_WIDE) * _BLOCK_N_WIDE:
            block_n = _BLOCK_N_NARROW
    return _BLOCK_M_WIDE, block_n, _BMM_WARPS_WIDE


_PRECISIONS = ("ieee", "tf32", "tf32x3", "fp32", "fp16")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _has_tf32(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def dot_precision(precision: str, device: torch.device) -> str:
    """Triton's input precision for ``precision`` on ``device``.

    ``"fp32"`` means fp32-grade products: 3xTF32 (``"tf32x3"``) on tensor-core GPUs (sm_80+),
    where plain ``"ieee"`` compiles to FMA only (benchmarks/AOT_AUDIT.md: 1024 FFMA, no MMA, in
    the bmm kernel's K loop), else ``"ieee"``. Emulated on the CPU (tf32 rounding of the hi / lo
    halves, 4096 x 1024, k = 256, 4 power iterations, spectra 1/i, 0.97^i, i^-0.5), every
    fp32-grade product done as 3xTF32 gives the same error ratio as IEEE to 4 digits and
    |U^T U - I| of 1.3-2.7e-7 against 0.7-2.3e-7. The interpreter computes every precision in fp32.
    A half-precision ``a`` turns 3xTF32 into 2xTF32 in the kernel (:func:`kernel_precision`).
    """
    if precision != "fp32":
        return precision
    return "tf32x3" if device.type == "cuda" and _has_tf32(device) else "ieee"


def kernel_precision(precision: str, a_dtype: torch.dtype, device: torch.device) -> str:
    """``bmm_kernel``'s ``PRECISION`` for ``precision`` and an ``a`` of ``a_dtype`` on ``device``.

    :func:`dot_precision`, except that 3xTF32 of an fp16 / bf16 ``a`` is ``"tf32x2"``: tf32 holds
    those values exactly (10 mantissa bits at most, fp32's exponent range), so ``a`` needs no lo
    half and two tf32 MMAs, ``a x_hi + a x_lo`` with ``x = x_hi + x_lo`` split in registers, give
    the fp32-grade product of three (~2^-21 relative per element of ``x``).
    """
    resolved = dot_precision(precision, device)
    return "tf32x2" if resolved == "tf32x3" and a_dtype in _HALF_DTYPES else resolved


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def batched_matmul(
    a: torch.Tensor,
    x: torch.Tensor,
    precision: str = "fp32",
) -> torch.Tensor:
    """``a @ x`` for ``a (B, M, K)`` in fp32/bf16/fp16 (any strides) and ``x (B, K, N)`` fp32, in fp32.

    ``precision`` is Triton's dot input precision: ``"ieee"`` (true fp32 products), ``"tf32"``
    (tensor cores, ~1e-3 relative error), ``"tf32x3"`` (three tf32 products, ~fp32 accuracy; two
    for an fp16 / bf16 ``a``, :func:`kernel_precision`), or ``"fp32"``: fp32-grade, the fastest of
    those two the device has (:func:`dot_precision`); or ``"fp16"`` for an fp16 ``a`` only: ``x``
    rounded to fp16 in registers and one fp16 MMA (fp32 accumulation), tf32's 10 mantissa bits at
    twice its rate, for an ``x`` well inside fp16's range (entries of 6e-5 to 6e4 keep their bits).
    """
    if a.dim() != 3 or x.dim() != 3 or a.shape[0] != x.shape[0] or a.shape[2] != x.shape[1]:
        raise ValueError(f"batched_matmul needs a (B, M, K) and x (B, K, N); got {tuple(a.shape)} and {tuple(x.shape)}")
    if a.dtype not in _FLOAT_DTYPES or x.dtype != torch.float32:
        raise ValueError(
            f"batched_matmul needs a in float32/bfloat16/float16 and x in float32; got {a.dtype} and {x.dtype}"
        )
    if a.device != x.device:
        raise ValueError(f"a and x must be on one device; got {a.device} and {x.device}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} is not a dot precision; allowed: {', '.join(_PRECISIONS)}")
    if precision == "fp16" and a.dtype != torch.float16:
        raise ValueError(f"precision 'fp16' needs a in float16; got {a.dtype}")
    batch, m, k = a.shape
    n = x.shape[2]
    from fasttrunc.kernels._svd_triton import bmm_kernel

    c = torch.empty(batch, m, n, dtype=torch.float32, device=a.device)
    if c.numel() == 0:
        return c
    if k == 0:
        return c.zero_()
    dot = kernel_precision(precision, a.dtype, a.device)
    block_m, block_n, warps = bmm_tiles(n, dot, a.element_size())
    grid = (_cdiv(m, block_m) * _cdiv(n, block_n), batch, 1)
    with _device_guard(a.device):
        bmm_kernel[grid](
            a,
            x,
            c,
            m,
            n,
            k,
            *a.stride(),
            *x.stride(),
            *c.stride(),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=_BLOCK_K,
            PRECISION=dot,
            num_warps=warps,
        )
    return c


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Launches go to the tensors' device, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def batched_matmul_reference(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Torch oracle of :func:`batched_matmul`: the product in fp64, returned in fp32."""
    return (a.double() @ x.double()).float()


# Jacobi tiles hold ~4096 elements (pairs x rows): 16 fp32 values a thread per tile at 8 warps,
# so the four tiles of the rotation pass and their pointers stay in registers. A column pair
# converges to |a_p.a_q| <= tol |a_p||a_q| with tol = max(l, 16) * 2^-24 (LAPACK's m * eps
# criterion in fp32); 30 sweeps is far above the 5-8 measured for R^T at l = 74..281 (one-sided
# Jacobi converges quadratically). A matrix that used every sweep counts as not converged.
# Pairs whose inner product is below eps^2 |R|_F^2 of their own matrix are rounding noise.
_JACOBI_TILE, _JACOBI_WARPS, _JACOBI_MAX_SWEEPS = 4096, 8, 30
# The X programs log each round's rotations, SWEEPS_PER_LAUNCH sweeps a launch (a log of
# 2 x 265 x 2 x 133 floats a matrix at l = 266: 0.56 MB, twice: the halves alternate), and the
# replay programs apply them to V, a block of V's rows each: 8192 fp32 values of V a program, for
# up to 512 padded columns (sm_90, the merged kernel: 224 registers at l = 266 under triton 3.9,
# 232 under 3.6, no spills; benchmarks/AOT_AUDIT.md). Past 512 columns the replay's tile spills
# under triton 3.6 (64-80 bytes at 1024 columns, whatever its rows), so there the X programs
# rotate V themselves, as one kernel did before the replay.
_JACOBI_SWEEPS_PER_LAUNCH, _REPLAY_MAX_COLUMNS = 2, 512


def replay_block_r(block_c: int) -> int:
    """Rows of V a replay program holds, for ``block_c`` padded columns."""
    return max(4, min(64, 8192 // block_c))


def jacobi_svd(
    r: torch.Tensor, max_sweeps: int = _JACOBI_MAX_SWEEPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD ``r = u diag(s) v^T`` of a batch of small square fp32 matrices ``(B, l, l)``, one program each.

    Returns ``u, s, v, sweeps`` with ``s`` sorted descending and ``sweeps`` the number of
    Jacobi sweeps each matrix took. ``v`` is a product of rotations (orthonormal to rounding);
    the columns of ``u`` are those of ``r v`` normalized, orthonormal to the Jacobi tolerance,
    and zero where the singular value is zero (a rank-deficient ``r`` gives no NaN).
    """
    if r.dim() != 3 or r.shape[1] != r.shape[2]:
        raise ValueError(f"jacobi_svd needs a batch of square matrices (B, l, l); got {tuple(r.shape)}")
    if r.dtype != torch.float32:
        raise ValueError(f"jacobi_svd needs float32 input; got {r.dtype}")
    batch, l, _ = r.shape
    npair = (l + 1) // 2
    n_cols = 2 * npair
    # Transposed, zero-padded to an even column count: row j of the buffer is column j of r.
    # Rows padded to a multiple of 32 floats: 128-bit loads whatever l is (l = 266 compiled to
    # scalar loads and 254 registers with rows l floats apart; benchmarks/AOT_AUDIT.md).
    stride = _cdiv(n_cols, 32) * 32
    x = torch.zeros(batch, n_cols, stride, dtype=torch.float32, device=r.device)
    x[:, :l, :l] = r.mT
    v = torch.zeros(batch, n_cols, stride, dtype=torch.float32, device=r.device)
    v[:, :, :n_cols] = torch.eye(n_cols, dtype=torch.float32, device=r.device)
    # (sweeps so far, the last sweep's largest off-diagonal ratio): +inf until the first sweep.
    info = torch.zeros(batch, 2, dtype=torch.float32, device=r.device)
    info[:, 1] = float("inf")
    if batch and l:
        from fasttrunc.kernels._svd_triton import jacobi_kernel

        tol = max(l, 16) * 2.0**-24
        # Per matrix, on the device (no host sync): a small matrix batched with a large one keeps
        # its own floor instead of inheriting the large one's.
        floor = (2.0**-48 * torch.linalg.matrix_norm(r).square()).contiguous()
        block_p = _next_pow2(npair)
        block_r = max(1, min(_JACOBI_TILE // block_p, _next_pow2(l)))
        block_c = _next_pow2(n_cols)
        replay_rows = replay_block_r(block_c)
        # Two halves of the log and of the sweep counts: a launch's X programs write one while its
        # replay programs read the other (the previous launch's).
        sweeps = _JACOBI_SWEEPS_PER_LAUNCH
        replay = block_c <= _REPLAY_MAX_COLUMNS
        log_shape = (2, batch, sweeps, n_cols - 1, 2, npair) if replay else (1,)  # never written without it
        log = torch.empty(log_shape, dtype=torch.float32, device=r.device)
        count = torch.zeros(2, batch, dtype=torch.int32, device=r.device)
        grid = (batch * (1 + _cdiv(stride, replay_rows)) if replay else batch, 1, 1)
        launches = _cdiv(max_sweeps, sweeps)
        # A fixed number of launches (no host sync: a graph captures them all), the last one only
        # replaying; the X programs of a matrix that has converged return at once.
        with _device_guard(r.device):
            for t in range(launches + int(replay)):
                jacobi_kernel[grid](
                    x,
                    v,
                    info,
                    log,
                    count,
                    floor,
                    batch,
                    t % 2,
                    int(t < launches),
                    stride,  # rows run to the padded length: the pad is zero in x and stays so
                    npair,
                    stride,
                    tol,
                    max_sweeps,
                    SWEEPS=sweeps,
                    BLOCK_P=block_p,
                    BLOCK_R=block_r,
                    BLOCK_C=block_c,
                    REPLAY_R=replay_rows,
                    REPLAY=replay,
                    num_warps=_JACOBI_WARPS,
                )
    rot = x[:, :l, :l].mT  # columns of r v
    vr = v[:, :l, :l].mT
    s = torch.linalg.vector_norm(rot, dim=1)
    s, order = torch.sort(s, dim=-1, descending=True)
    idx = order[:, None, :].expand(batch, l, l)
    rot, vr = rot.gather(2, idx), vr.gather(2, idx)
    u = torch.where(s[:, None, :] > 0, rot / torch.where(s > 0, s, 1.0)[:, None, :], torch.zeros_like(rot))
    return u, s, vr, info[:, 0]


# One program per matrix, tiles of 64 rows above by 128 columns of fp64 (32 values a thread at 8
# warps): row j is a chain of ceil(j / 64) x ceil((l - j) / 128) tile loads, 916 in all at
# l = 266 against 1244 with 32 x 256 tiles (233 registers, no spills, sm_90).
_CHOLESKY_BLOCK_I, _CHOLESKY_BLOCK_K, _CHOLESKY_WARPS = 128, 64, 8


def batched_cholesky(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factors of a batch ``g (B, l, l)`` of symmetric fp64 matrices, one program each.

    Returns ``r`` (``g = r^T r``, zero below the diagonal) and ``info`` ``(B,)`` int32: 0, or 1 +
    the first pivot that is not positive (``r`` is then unreliable), as ``torch.linalg.cholesky_ex``
    reports it. Reads the upper triangle of ``g``. No host sync. torch's batched fp64 Cholesky
    cost about 0.11 ms a matrix at l = 266 on an H200 (BASELINES.md 2b, derived), the costliest
    small op of CholeskyQR; this kernel does l^3 / 6 fp64 multiply-adds a matrix, its reads in L2.
    """
    if g.dim() != 3 or g.shape[1] != g.shape[2]:
        raise ValueError(f"batched_cholesky needs a batch of square matrices (B, l, l); got {tuple(g.shape)}")
    if g.dtype != torch.float64:
        raise ValueError(f"batched_cholesky needs float64 input; got {g.dtype}")
    batch, l, _ = g.shape
    g = g.contiguous()
    r = torch.zeros_like(g)
    info = torch.zeros(batch, dtype=torch.int32, device=g.device)
    if batch and l:
        from fasttrunc.kernels._svd_triton import cholesky_kernel

        with _device_guard(g.device):
            cholesky_kernel[(batch, 1, 1)](
                g,
                r,
                info,
                l,
                l,
                BLOCK_I=_CHOLESKY_BLOCK_I,
                BLOCK_K=_CHOLESKY_BLOCK_K,
                num_warps=_CHOLESKY_WARPS,
            )
    return r, info


# A step counts as converged when its R differs from the identity by at most this (max entry): a
# step whose input has Q^T Q = I + E with |E| < 0.2 leaves an fp32-rounding-level error behind;
# converged matrices are left alone in later steps (their Q no longer changes).
_CHOLQR_DONE = 0.1
# A basis that only feeds the next power-iteration product needs its span, not exact
# orthonormality: a loose step is converged when kappa_F(R) = |R|_F |R^-1|_F <= 2^12 (measured in
# fp32: kappa_F = 4.3e3 leaves |Q^T Q - I| at 1.2e-4, 4096 x 1024, 1/i spectrum, l = 281).
_CHOLQR_LOOSE_KAPPA = 2.0**12
# Fixed step counts, so that the loop needs no host sync (and can be captured in a CUDA graph).
# Each step factors one Gram: the plain one, or the shifted one G + s I where the previous step
# found the plain one indefinite (that step leaves q alone). A Gram with condition number up to
# 1/eps_fp32 then takes 4 steps: the failed plain one, the shifted one, two plain ones (shifted
# CholeskyQR3); a loose basis the same at worst, since a shifted step squashes the directions
# below sqrt(s) and only a plain step may accept it (measured, 0.97^i spectrum, 4096x1024,
# l = 266: Y took all 4 steps). A matrix not converged after them is flagged.
_CHOLQR_STEPS = 4
# The per-matrix state of a CholeskyQR call (int32 bits, read and written by cholqr_step_kernel).
STATE_DONE, STATE_FAILED, STATE_SHIFT = 1, 2, 4
# Tiles: the Gram's and the update's are the 3xTF32 product tiles of 64 x 64 (the update's 64 rows
# by 64 columns, 32 deep); the step kernel's are batched_cholesky's.
_GRAM_BLOCK_N, _GRAM_BLOCK_K, _GRAM_WARPS = 64, 32, 4
_TRMM_BLOCK_M, _TRMM_BLOCK_N, _TRMM_BLOCK_K, _TRMM_WARPS = 64, 64, 32, 8


def _gram_upper(q: torch.Tensor, g: torch.Tensor, state: torch.Tensor) -> None:
    """Write ``q^T q`` (fp32-grade products) into the tiles on and above the diagonal of ``g``
    ``(B, l, l)`` fp32, for the matrices of ``q (B, m, l)`` whose ``state`` is not settled."""
    from fasttrunc.kernels._cholqr_triton import gram_kernel

    batch, m, l = q.shape
    tiles = _cdiv(l, _GRAM_BLOCK_N)
    with _device_guard(q.device):
        gram_kernel[(tiles * tiles, batch, 1)](
            q,
            g,
            state,
            m,
            l,
            *q.stride(),
            BLOCK_N=_GRAM_BLOCK_N,
            BLOCK_K=_GRAM_BLOCK_K,
            PRECISION=dot_precision("fp32", q.device),
            num_warps=_GRAM_WARPS,
        )


def _update_in_place(q: torch.Tensor, rinv: torch.Tensor, hold: torch.Tensor) -> None:
    """``q <- q rinv`` in place for ``q (B, m, l)`` fp32 and upper triangular ``rinv (B, l, l)`` fp32
    (contiguous, zero below the diagonal), fp32-grade products; matrices with ``hold != 0`` keep ``q``."""
    from fasttrunc.kernels._cholqr_triton import trmm_inplace_kernel

    batch, m, l = q.shape
    with _device_guard(q.device):
        trmm_inplace_kernel[(_cdiv(m, _TRMM_BLOCK_M), batch, 1)](
            q,
            rinv,
            hold,
            m,
            l,
            *q.stride(),
            BLOCK_M=_TRMM_BLOCK_M,
            BLOCK_N=_TRMM_BLOCK_N,
            BLOCK_K=_TRMM_BLOCK_K,
            PRECISION=dot_precision("fp32", q.device),
            num_warps=_TRMM_WARPS,
        )


class _StepBuffers:
    """The device state of one CholeskyQR call on ``total`` matrices of ``l`` columns (its own: two
    calls in flight never share one)."""

    def __init__(self, total: int, l: int, coef: torch.Tensor, device: torch.device) -> None:
        self.l = l
        self.g = torch.empty(total, l, l, dtype=torch.float32, device=device)
        self.state = torch.zeros(total, dtype=torch.int32, device=device)
        self.coef = coef
        self.r = torch.zeros(total, l, l, dtype=torch.float64, device=device)  # this step's R
        self.x = torch.zeros(total, l, l, dtype=torch.float64, device=device)  # its inverse
        self.rinv = torch.zeros(total, l, l, dtype=torch.float32, device=device)  # the inverse, for the update
        self.hold = torch.zeros(total, dtype=torch.uint8, device=device)
        self.aux = torch.zeros(total, dtype=torch.float64, device=device)  # |R|_F^2 (inf: no loose test)
        self.sums = torch.zeros(total, dtype=torch.float32, device=device)  # |R^-1|_F^2, summed over blocks
        self.tickets = torch.zeros(total, dtype=torch.int32, device=device)


# The inverse's column blocks: 64 columns a program (5 programs a matrix at l = 266), 64-deep steps.
_INVERSE_BLOCK_J, _INVERSE_BLOCK_K, _INVERSE_WARPS = 64, 64, 4


def _cholqr_step(buffers: _StepBuffers, loose: bool) -> None:
    """The small work of one CholeskyQR step of every matrix, on the device (no host sync): factor
    the Gram in ``buffers.g`` (shifted where the state says so) and update ``state`` and ``hold``
    (``cholqr_step_kernel``, one program a matrix), then invert the R of those not held
    (``upper_inverse_kernel``, a block of columns a program) and, ``loose``, accept those whose R
    is well enough conditioned."""
    from fasttrunc.kernels._cholqr_triton import cholqr_step_kernel, upper_inverse_kernel

    total, l = buffers.state.shape[0], buffers.l
    with _device_guard(buffers.g.device):
        cholqr_step_kernel[(total, 1, 1)](
            buffers.g,
            buffers.state,
            buffers.coef,
            buffers.r,
            buffers.hold,
            buffers.aux,
            l,
            _CHOLQR_DONE,
            BLOCK_I=_CHOLESKY_BLOCK_I,
            BLOCK_K=_CHOLESKY_BLOCK_K,
            num_warps=_CHOLESKY_WARPS,
        )
        upper_inverse_kernel[(total, _cdiv(l, _INVERSE_BLOCK_J), 1)](
            buffers.r,
            buffers.x,
            buffers.rinv,
            buffers.hold,
            buffers.state,
            buffers.aux,
            buffers.sums,
            buffers.tickets,
            l,
            _CHOLQR_LOOSE_KAPPA,
            LOOSE=loose,
            BLOCK_J=_INVERSE_BLOCK_J,
            BLOCK_K=_INVERSE_BLOCK_K,
            num_warps=_INVERSE_WARPS,
        )


def cholesky_qr_ex(y: torch.Tensor, loose: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cholesky_qr` without the repair: ``q, r, failed``, and never a wait for the device.

    A matrix that fails (all zeros, rank deficient, not converged in the fixed steps) is flagged
    in the ``(B,)`` bool ``failed`` and gets ``q`` = the first ``l`` columns of the identity and
    ``r = 0``, so that every later step stays finite; what it computes from them is unreliable
    (exact for an all-zero ``y``). The whole call can be captured in a CUDA graph. ``y`` is not
    written.
    """
    return _cholesky_qr_group([y.clone()], loose)[0]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _cholesky_qr_group(
    ys: list[torch.Tensor], loose: bool, need_r: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`cholesky_qr_ex` of several batches ``(B_i, m_i, l)`` with one ``l`` in lock step,
    **overwriting** each ``y`` with its ``q``: a step is a Gram launch per batch, one
    ``cholqr_step_kernel`` launch for every matrix of every batch (the latency-bound fp64 Cholesky
    and inverse), and an in-place update launch per batch. Matrices that have settled cost those
    kernels nothing (their programs read one state word) and no copy. ``need_r=False`` skips
    accumulating R (the range finder's bases need only Q): each ``r`` is then empty, ``(B_i, 0, 0)``."""
    sizes = [y.shape[0] for y in ys]
    l, device = ys[0].shape[-1], ys[0].device
    total = sum(sizes)
    # Shifted CholeskyQR3's s = (m l + l (l + 1)) 2^-24 trace(G) / l: the factor of trace(G) per matrix.
    coef = _cat(
        [
            torch.full((y.shape[0],), (y.shape[1] * l + l * (l + 1)) * 2.0**-24 / l, dtype=torch.float64, device=device)
            for y in ys
        ]
    )
    buffers = _StepBuffers(total, l, coef, device)
    states = buffers.state.split(sizes)
    grams = buffers.g.split(sizes)
    rinvs, holds = buffers.rinv.split(sizes), buffers.hold.split(sizes)
    r = torch.eye(l, dtype=torch.float64, device=device).repeat(total, 1, 1) if need_r else None
    for _ in range(_CHOLQR_STEPS):
        for y, g, state in zip(ys, grams, states):
            _gram_upper(y, g, state)
        _cholqr_step(buffers, loose)
        for y, rinv, hold in zip(ys, rinvs, holds):
            _update_in_place(y, rinv, hold)
        if r is not None:
            r = torch.where(buffers.hold.bool()[:, None, None], r, buffers.r @ r)
    failed = (buffers.state & STATE_DONE) == 0
    failed |= ~_cat([torch.isfinite(y).flatten(1).all(1) for y in ys])
    if r is None:
        r_parts = [torch.empty(n, 0, 0, dtype=torch.float64, device=device) for n in sizes]
    else:
        r_parts = list(
            torch.where(failed[:, None, None], torch.zeros((), dtype=r.dtype, device=device), r).split(sizes)
        )
    out = []
    for y, r_part, f in zip(ys, r_parts, failed.split(sizes)):
        stand_in = torch.eye(y.shape[1], l, dtype=torch.float32, device=device)
        out.append((torch.where(f[:, None, None], stand_in, y, out=y), r_part, f))
    return out


def cholesky_qr(y: torch.Tensor, loose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = q r`` for a batch ``(B, m, l)`` fp32, ``m >= l``: ``q`` fp32 orthonormal, ``r`` fp64 upper.

    CholeskyQR2 (Gram with fp32-grade products, Cholesky in fp64) with a fixed 4 steps
    (``loose=True`` accepts a plain step whose ``R`` is well enough conditioned for ``q`` to be
    orthonormal to ~1e-4: enough between power iterations). Where the plain Gram is not
    numerically positive definite, the next step factors the shifted Gram ``G + s I``,
    ``s = (m l + l (l + 1)) 2^-24 trace(G) / l`` (shifted CholeskyQR3). The loop itself never waits
    for the device (:func:`cholesky_qr_ex`); a matrix that fails even then (all zeros, or not
    converged) is factored with Householder QR after it (one host read).
    """
    q, r, failed = cholesky_qr_ex(y, loose)
    if bool(failed.any()):
        qh, rh = torch.linalg.qr(y[failed].double(), mode="reduced")
        q, r = q.clone(), r.clone()
        q[failed], r[failed] = qh.float(), rh
    return q, r


# Passes over W that only steer the range finder (the sketch and all but the last power-iteration
# product) run on tf32 tensor cores, ~2.6x faster than fp32 FMA (benchmarks/BASELINES.md 2b). The two passes
# the factors are read from, the last W Z (it defines Q, hence U) and the projection W^T Q, use
# fp32-grade products (3xTF32 on tensor-core GPUs, see dot_precision). Measured with tf32 rounding emulated on CPU (4096x1024, k = 256, 6 iterations,
# sigma_i = 0.97^i): all passes tf32 give 1.029x the optimal error, tf32 with those two in fp32
# 1.0000x, like all fp32; for 1/i and i^-0.5 spectra tf32 changes nothing measurable.
RANGE_PRECISION = "tf32"
PROJECTION_PRECISION = "fp32"


def _pass_precision(precision: str, w_dtype: torch.dtype) -> str:
    """The precision of one pass over a ``w_dtype`` W: tf32 passes (the range-steering ones at the
    defaults) over fp16 weights run as fp16 MMAs (:func:`batched_matmul`'s ``"fp16"``: x is the
    Gaussian sketch or an orthonormal basis, far inside fp16's range, rounded to the same 10
    mantissa bits as tf32, at twice the rate); bf16 weights keep tf32. Emulated on the CPU
    (bf16-stored W, x rounded in the range passes, the last W Z and W^T Q in fp32; 2048x512 k = 128
    and 4096x1024 k = 256, n_iter 2 (os 10) and 6 (os 16 / 32), spectra 1/i, i^-0.5, 0.97^i, mean
    of 3 draws): x in tf32 or fp16 moves the error ratio by at most 1e-6, in bf16 by up to 1.5e-5
    (1.003138 -> 1.003123, 1.016661 -> 1.016666): small but measurable, so no bf16 MMAs."""
    return "fp16" if precision == "tf32" and w_dtype == torch.float16 else precision


# _cholesky_qr_group (which overwrites ys), or the repairing _cholesky_qr_flagged:
# (ys, loose, need_r) -> [(q, r, failed)].
_QR = Callable[[list[torch.Tensor], bool, bool], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def _cholesky_qr_flagged(
    ys: list[torch.Tensor], loose: bool, need_r: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`cholesky_qr` (with its Householder repair) of each batch, in :func:`_cholesky_qr_group`'s
    form (``need_r`` is ignored: the repair needs R's of its own)."""
    out = []
    for y in ys:
        q, r = cholesky_qr(y, loose)
        out.append((q, r, torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)))
    return out


def _sketch(
    w: torch.Tensor, k: int, oversample: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The side to sketch (``w`` or a transposed view, so that ``m >= n``), its Gaussian test
    matrix ``(B, n, l)`` and whether ``w`` was transposed (Q is then (B, max, l) and the small
    problems are l x l)."""
    m, n = w.shape[-2:]
    transpose = m < n
    if transpose:
        w = w.mT  # a strided view: the kernels read it in place
    _refuse_frozen_draw(w.device, generator)
    g = gaussian_sketch(
        w.shape[:-2], min(m, n), k + oversample, dtype=torch.float32, device=w.device, generator=generator
    )
    return w, g, transpose


def _sketches(
    ws: list[torch.Tensor], ks: list[int], oversamples: list[int], generator: torch.Generator | None
) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """:func:`_sketch` of each batch in turn (one rank and one oversample per batch)."""
    if not len(ws) == len(ks) == len(oversamples):
        raise ValueError(
            f"one k and one oversample per batch: got {len(ws)} batches, {len(ks)} ks, {len(oversamples)} oversamples"
        )
    return [_sketch(w, k, os_, generator) for w, k, os_ in zip(ws, ks, oversamples)]


def _refuse_frozen_draw(device: torch.device, generator: torch.Generator | None) -> None:
    """A generator off the weights' CUDA device cannot feed a CUDA graph capture: its draw would
    be frozen into the graph, and the copy from host memory cannot be captured."""
    if device.type == "cuda" and generator is not None and generator.device != device:
        if torch.cuda.is_current_stream_capturing():
            raise ValueError(
                f"generator on {generator.device} cannot feed a CUDA graph capture on {device}: "
                "pass generator=None or a generator on the weights' device"
            )


def _range_and_projection(
    ws: list[torch.Tensor],
    gs: list[torch.Tensor],
    n_iter: int,
    range_precision: str,
    projection_precision: str,
    qr: _QR,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch ``w (B, m, n)``, ``m >= n``, of one ``l``: ``Q`` (orthonormal basis of its range,
    from the sketch ``g``), ``Q2, R`` with ``W^T Q = Q2 R``, and which matrices one of the
    factorizations flagged. The batches go in lock step, their factorizations batched together."""

    def products(xs: list[torch.Tensor], transposed: bool, precision: str) -> list[torch.Tensor]:
        return [
            batched_matmul(w.mT if transposed else w, x, _pass_precision(precision, w.dtype)) for w, x in zip(ws, xs)
        ]

    # The last basis is U's: computed in projection precision and orthonormal to fp32 rounding.
    qs = qr(products(gs, False, range_precision if n_iter else projection_precision), n_iter > 0, False)
    failed = [f for _, _, f in qs]
    for i in range(n_iter):
        last = i == n_iter - 1
        zs = qr(products([q for q, _, _ in qs], True, range_precision), True, False)
        qs = qr(
            products([z for z, _, _ in zs], False, projection_precision if last else range_precision), not last, False
        )
        failed = [f | f1 | f2 for f, (_, _, f1), (_, _, f2) in zip(failed, zs, qs)]
    q2s = qr(products([q for q, _, _ in qs], True, projection_precision), False, True)  # B^T = (Q^T W)^T = Q2 R
    return [(q, q2, r, f | f3) for (q, _, _), (q2, r, f3), f in zip(qs, q2s, failed)]


# What the info of randomized_svd_triton_many_ex flags, per matrix (bits, 0 = sound).
INFO_BASIS, INFO_JACOBI = 1, 2


def _solve_many(
    ws: list[torch.Tensor],
    gs: list[torch.Tensor],
    ks: list[int],
    n_iter: int,
    range_precision: str,
    projection_precision: str,
    jacobi_max_sweeps: int,
    repair: bool,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``U, S, V^T`` and info per batch of the sketched sides ``ws`` (``m >= n``) from their sketches.

    ``repair=False``: no host sync, flagged matrices are left as they came out (the info says
    which). ``repair=True``: CholeskyQR repairs with Householder QR, and a small matrix whose
    Jacobi SVD used every sweep is solved again by ``torch.linalg.svd`` in fp64 (host reads).
    """
    qr = _cholesky_qr_flagged if repair else _cholesky_qr_group
    by_l: dict[tuple[int, torch.device], list[int]] = {}  # batches that share launches
    for i, g in enumerate(gs):
        by_l.setdefault((g.shape[-1], g.device), []).append(i)
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    slots: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for members in by_l.values():
        group = [ws[i] for i in members], [gs[i] for i in members]
        parts.update(zip(members, _range_and_projection(*group, n_iter, range_precision, projection_precision, qr)))
        # B^T = Q2 R, so B = R^T Q2^T; Jacobi runs on R^T (its columns come out of the power
        # iteration graded by size, which saves a sweep over R): R^T = U_T S V_T^T.
        rt = torch.cat([parts[i][2].mT for i in members])  # fp64 R^T
        u_t, s, v_t, sweeps = jacobi_svd(rt.float(), max_sweeps=jacobi_max_sweeps)
        unconverged = sweeps >= jacobi_max_sweeps
        if repair and bool(unconverged.any()):
            u64, s64, vh64 = torch.linalg.svd(rt[unconverged])
            u_t, s, v_t = u_t.clone(), s.clone(), v_t.clone()
            u_t[unconverged], s[unconverged], v_t[unconverged] = u64.float(), s64.float(), vh64.mT.float()
            unconverged = torch.zeros_like(unconverged)
        lo = 0
        for i in members:
            hi = lo + parts[i][2].shape[0]
            info = parts[i][3].to(torch.int32) * INFO_BASIS + unconverged[lo:hi].to(torch.int32) * INFO_JACOBI
            slots[i] = (u_t[lo:hi], s[lo:hi], v_t[lo:hi], info)
            lo = hi
    out = []
    for i, k in enumerate(ks):
        q, q2 = parts[i][0], parts[i][1]
        u_t, s, v_t, info = slots[i]
        # W ~ Q B = (Q U_T) S (Q2 V_T)^T.
        u = batched_matmul(q, u_t[..., :k].contiguous(), "fp32")
        v = batched_matmul(q2, v_t[..., :k].contiguous(), "fp32")
        out.append((u, s[..., :k], v.mT, info))
    return out


def randomized_svd_triton_many_ex(
    ws: list[torch.Tensor],
    ks: list[int],
    *,
    n_iter: int,
    oversamples: list[int],
    generator: torch.Generator | None = None,
    range_precision: str = RANGE_PRECISION,
    projection_precision: str = PROJECTION_PRECISION,
    jacobi_max_sweeps: int = _JACOBI_MAX_SWEEPS,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`randomized_svd_triton_many` that never waits for the device: ``U, S, Vh, info`` per batch.

    ``info`` ``(B_i,)`` int32 is 0 for a sound matrix; bit :data:`INFO_BASIS` marks one whose
    CholeskyQR failed (all zeros or rank deficient: its basis is a stand-in), bit
    :data:`INFO_JACOBI` one whose small Jacobi SVD used every sweep. Their triplets are
    unreliable: solve them again with :func:`randomized_svd_triton_many` (which does so itself,
    reading ``info`` once). With ``generator=None`` or a generator on the weights' device the
    whole call can be captured in a CUDA graph and replayed (a CPU generator is refused during
    a capture: its draw would be frozen into the graph).
    """
    args = (n_iter, range_precision, projection_precision, jacobi_max_sweeps)
    sides, solved = _first_pass(ws, ks, oversamples, generator, args)
    return [_orient(part, transpose) for part, (_, _, transpose) in zip(solved, sides)]


def _first_pass(
    ws: list[torch.Tensor],
    ks: list[int],
    oversamples: list[int],
    generator: torch.Generator | None,
    args: tuple[int, str, str, int],
) -> tuple[
    list[tuple[torch.Tensor, torch.Tensor, bool]], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
]:
    """The sketched sides of every batch and their sync-free solution (``_solve_many`` unrepaired);
    ``args`` are ``n_iter, range_precision, projection_precision, jacobi_max_sweeps``."""
    sides = _sketches(ws, ks, oversamples, generator)
    return sides, _solve_many([w for w, _, _ in sides], [g for _, g, _ in sides], ks, *args, repair=False)


def _orient(
    part: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], transpose: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh, info`` of the weights from those of the side that was sketched."""
    u, s, vh, info = part
    return (vh.mT, s, u.mT, info) if transpose else part


def randomized_svd_triton_many(
    ws: list[torch.Tensor],
    ks: list[int],
    *,
    n_iter: int,
    oversamples: list[int],
    generator: torch.Generator | None = None,
    range_precision: str = RANGE_PRECISION,
    projection_precision: str = PROJECTION_PRECISION,
    jacobi_max_sweeps: int = _JACOBI_MAX_SWEEPS,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`randomized_svd_triton` for several batches ``(B_i, m_i, n_i)`` of different shapes.

    The passes over each batch run per batch; the small Jacobi SVDs of every batch with the same
    ``l = k + oversample`` run in one launch, so a model's differently shaped matrices share it.
    Sketches are drawn batch by batch in order: the results equal one call per batch in turn.
    Everything runs without a host sync (:func:`randomized_svd_triton_many_ex`) up to one read of
    the info of all batches at the end; the matrices it flags (all zeros, rank deficient, or a
    Jacobi SVD that used all ``jacobi_max_sweeps`` sweeps) are solved again from their own sketch
    with the repairs: Householder QR where CholeskyQR fails, ``torch.linalg.svd`` in fp64 for the
    small SVD that did not converge.
    """
    args = (n_iter, range_precision, projection_precision, jacobi_max_sweeps)
    sides, solved = _first_pass(ws, ks, oversamples, generator, args)
    flagged = [info != 0 for _, _, _, info in solved]
    # The one host read: which batches hold a flagged matrix.
    hits = torch.stack([f.any().to(flagged[0].device) for f in flagged]).tolist() if flagged else []
    again = [i for i, hit in enumerate(hits) if hit]
    if again:
        redo = _solve_many(
            [sides[i][0][flagged[i]] for i in again],
            [sides[i][1][flagged[i]] for i in again],
            [ks[i] for i in again],
            *args,
            repair=True,
        )
        for i, (u2, s2, vh2, _) in zip(again, redo):
            u, s, vh, info = (t.clone() for t in solved[i])
            u[flagged[i]], s[flagged[i]], vh[flagged[i]] = u2, s2, vh2
            solved[i] = (u, s, vh, torch.zeros_like(info))
    return [_orient(part, transpose)[:3] for part, (_, _, transpose) in zip(solved, sides)]


def randomized_svd_triton(
    w: torch.Tensor,
    k: int,
    *,
    n_iter: int,
    oversample: int,
    generator: torch.Generator | None = None,
    range_precision: str = RANGE_PRECISION,
    projection_precision: str = PROJECTION_PRECISION,
    jacobi_max_sweeps: int = _JACOBI_MAX_SWEEPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` ``U, S, Vh`` (fp32) of a batch ``w (B, m, n)`` in fp32/bf16/fp16, read as stored.

    Same contract as :func:`randomized_svd_reference` (``0 < k``, ``k + oversample < min(m, n)``,
    finite input); the Gaussian sketch is drawn the same way, so a generator gives the same
    subspace up to rounding on either path.
    """
    return randomized_svd_triton_many(
        [w],
        [k],
        n_iter=n_iter,
        oversamples=[oversample],
        generator=generator,
        range_precision=range_precision,
        projection_precision=projection_precision,
        jacobi_max_sweeps=jacobi_max_sweeps,
    )[0]


# ---------------------------------------------------------------------------------------------
# 3. Torch reference
# ---------------------------------------------------------------------------------------------


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` (batched, reduced Householder QR)."""
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def gaussian_sketch(
    batch_shape: torch.Size,
    n: int,
    l: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The ``(..., n, l)`` Gaussian test matrix, drawn on the generator's device then moved.

    Drawing on the generator's own device keeps a CPU generator reproducible for CUDA weights.
    """
    gen_device = generator.device if generator is not None else device
    g = torch.randn(*batch_shape, n, l, generator=generator, dtype=dtype, device=gen_device)
    return g.to(device)


def randomized_svd_reference(
    w: torch.Tensor, k: int, *, n_iter: int, oversample: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` ``U, S, Vh`` of ``w`` ``(..., m, n)``, computed in ``w``'s dtype (fp32 or fp64).

    The caller guarantees ``0 < k`` and ``k + oversample < min(m, n)`` (otherwise the exact SVD
    is cheaper and exact) and finite input.
    """
    m, n = w.shape[-2:]
    transpose = m < n  # sketch the smaller side: Q is (.., max, l) and the small SVD is l x min
    if transpose:
        w = w.mT
        m, n = n, m
    l = k + oversample
    g = gaussian_sketch(w.shape[:-2], n, l, dtype=w.dtype, device=w.device, generator=generator)
    q = _orthonormalize(w @ g)
    for _ in range(n_iter):
        z = _orthonormalize(w.mT @ q)
        q = _orthonormalize(w @ z)
    u_small, s, vh = torch.linalg.svd(q.mT @ w, full_matrices=False)
    u = q @ u_small[..., :k]
    s, vh = s[..., :k], vh[..., :k, :]
    if transpose:
        return vh.mT, s, u.mT
    return u, s, vh


# ---------------------------------------------------------------------------------------------
# 5. Public functional
# ---------------------------------------------------------------------------------------------


def randomized_svd(
    w: torch.Tensor, k: int, *, n_iter: int, oversample: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` triplets of ``w (..., m, n)``: the Triton path where ``use_triton`` says so, else torch.

    Triton reads fp32 / bf16 / fp16 weights as stored and returns fp32; the torch path computes
    in fp32 (fp64 for fp64 input, which always takes the torch path). Same caller contract as
    :func:`randomized_svd_reference`.
    """
    if w.dtype in _FLOAT_DTYPES and use_triton(w):
        batch = w.shape[:-2]
        flat = w.reshape(-1, *w.shape[-2:]) if len(batch) != 1 else w
        u, s, vh = randomized_svd_triton(flat, k, n_iter=n_iter, oversample=oversample, generator=generator)
        return u.reshape(*batch, *u.shape[-2:]), s.reshape(*batch, k), vh.reshape(*batch, *vh.shape[-2:])
    work = w if w.dtype == torch.float64 else w.float()
    return randomized_svd_reference(work, k, n_iter=n_iter, oversample=oversample, generator=generator)


def randomized_svd_many(
    ws: list[torch.Tensor],
    ks: list[int],
    *,
    n_iter: int,
    oversamples: list[int],
    generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`randomized_svd` for several batches ``(B_i, m_i, n_i)``; on Triton their small SVDs share launches."""
    if ws and all(w.dtype in _FLOAT_DTYPES and w.dim() == 3 for w in ws) and use_triton(*ws):
        return randomized_svd_triton_many(ws, ks, n_iter=n_iter, oversamples=oversamples, generator=generator)
    return [
        randomized_svd(w, k, n_iter=n_iter, oversample=os_, generator=generator)
        for w, k, os_ in zip(ws, ks, oversamples)
    ]


__all__ = [
    "randomized_svd_many",
    "batched_matmul",
    "batched_matmul_reference",
    "cholesky_qr",
    "gaussian_sketch",
    "jacobi_svd",
    "randomized_svd",
    "randomized_svd_reference",
    "randomized_svd_triton",
    "randomized_svd_triton_many",
    "randomized_svd_triton_many_ex",
    "cholesky_qr_ex",
    "batched_cholesky",
    "INFO_BASIS",
    "INFO_JACOBI",
]
