# mypy: allow-untyped-defs
"""Triton kernels of the batched randomized SVD (layer 1; imported on first launch).

- :func:`bmm_kernel`: batched ``C = A @ X`` reading ``A`` as stored (fp32 / bf16 / fp16, any
  strides, so a transposed view costs nothing), ``X`` and ``C`` fp32, a matrix flagged to skip
  getting ``A`` or ``I`` instead of its product;
- :func:`cholesky_kernel`: left-looking fp64 Cholesky of one small matrix per program;
- :func:`jacobi_kernel`: one-sided (Hestenes) Jacobi SVD of one small square matrix per program,
  every sweep inside one launch, with a per-matrix rounding floor.
Offsets that multiply an index by a stride are int64: one matrix of a batch may pass 2^31 elements.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bmm_kernel(
    a_ptr,
    x_ptr,
    c_ptr,
    skip_ptr,
    M,
    N,
    K,
    s_ab,
    s_am,
    s_ak,
    s_xb,
    s_xk,
    s_xn,
    s_cb,
    s_cm,
    s_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SKIP: tl.constexpr,
):
    # C[b] = A[b] @ X[b]; A in any float dtype and any strides (a transposed view costs
    # nothing), X fp32, accumulation and C in fp32. SKIP (0: none) reads one flag per matrix: a
    # flagged matrix gets C[b] = A[b] (SKIP == 1, the product with an identity X) or C[b] = I
    # (SKIP == 2) without its product being computed.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # int64 before the stride products: m x k of one matrix may pass 2^31 elements.
    rm64, rn64, rk64 = rm.to(tl.int64), rn.to(tl.int64), rk.to(tl.int64)
    skipped = False
    if SKIP != 0:
        skipped = tl.load(skip_ptr + b) != 0
    if skipped:
        # Output pointers are formed where they are stored: live across the K loop they cost
        # registers (and spills, sm_90).
        c_ptrs = c_ptr + b * s_cb + rm64[:, None] * s_cm + rn64[None, :] * s_cn
        c_mask = (rm[:, None] < M) & (rn[None, :] < N)
        if SKIP == 1:
            src_ptrs = a_ptr + b * s_ab + rm64[:, None] * s_am + rn64[None, :] * s_ak
            tl.store(c_ptrs, tl.load(src_ptrs, mask=c_mask, other=0.0).to(tl.float32), mask=c_mask)
        else:
            tl.store(c_ptrs, tl.where(rm[:, None] == rn[None, :], 1.0, 0.0), mask=c_mask)
    else:
        a_ptrs = a_ptr + b * s_ab + rm64[:, None] * s_am + rk64[None, :] * s_ak
        x_ptrs = x_ptr + b * s_xb + rk64[:, None] * s_xk + rn64[None, :] * s_xn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
            x = tl.load(x_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a.to(tl.float32), x, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * s_ak
            x_ptrs += BLOCK_K * s_xk
        c_ptrs = c_ptr + b * s_cb + rm64[:, None] * s_cm + rn64[None, :] * s_cn
        tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def jacobi_kernel(
    x_ptr,
    v_ptr,
    info_ptr,
    L,
    NPAIR,
    STRIDE,
    tol,
    floor_ptr,
    max_sweeps,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One-sided (Hestenes) Jacobi on the columns of one N x N matrix per program, N = 2*NPAIR.
    # Buffers hold the transpose (row j = column j, contiguous) so a column loads coalesced; rows
    # are STRIDE floats apart, a multiple of 32, so that the loads are 128 bits wide for any l.
    # L is the number of row entries processed: the launcher passes STRIDE (the padding is zero
    # in x and in v and rotations keep it zero), so masks stay 128-bit aligned too.
    # Round-robin ordering: each round rotates NPAIR disjoint column pairs at once; N - 1
    # rounds make a sweep in which every pair meets once. Sweeps repeat until no pair has
    # |a_p . a_q| > tol * |a_p| |a_q| (or max_sweeps). Pairs whose inner product is below this
    # matrix's rounding floor (eps^2 |R|_F^2, read per matrix) are left alone.
    b = tl.program_id(0).to(tl.int64)
    floor = tl.load(floor_ptr + b)
    n_cols = 2 * NPAIR
    x_base = x_ptr + b * n_cols * STRIDE
    v_base = v_ptr + b * n_cols * STRIDE
    i = tl.arange(0, BLOCK_P)
    pmask = i < NPAIR
    sweep = tl.program_id(0) * 0
    off = tol * 2.0
    while (sweep < max_sweeps) & (off > tol):
        off = tol * 0.0
        for r in range(0, n_cols - 1):
            pb = n_cols - 1 - i
            ca = tl.where(i == 0, 0, (i - 1 + r) % (n_cols - 1) + 1)
            cb = (pb - 1 + r) % (n_cols - 1) + 1
            # Elementwise sums over the row chunks, reduced across the rows once after the loop:
            # 3 cross-row reductions a round instead of 3 a chunk (18 chunks at l = 266; sm_90:
            # still 128 registers, no spills).
            alpha2 = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
            beta2 = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
            gamma2 = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
            for r0 in range(0, L, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                m2 = pmask[:, None] & (rows[None, :] < L)
                xa = tl.load(x_base + ca[:, None] * STRIDE + rows[None, :], mask=m2, other=0.0)
                xb = tl.load(x_base + cb[:, None] * STRIDE + rows[None, :], mask=m2, other=0.0)
                alpha2 += xa * xa
                beta2 += xb * xb
                gamma2 += xa * xb
            alpha = tl.sum(alpha2, axis=1)
            beta = tl.sum(beta2, axis=1)
            gamma = tl.sum(gamma2, axis=1)
            norm = tl.sqrt(alpha * beta)
            rotate = (tl.abs(gamma) > tol * norm) & (tl.abs(gamma) > floor) & pmask
            ratio = tl.where(rotate, tl.abs(gamma) / tl.where(rotate, norm, 1.0), 0.0)
            off = tl.maximum(off, tl.max(ratio, axis=0))
            g = tl.where(rotate, gamma, 1.0)
            zeta = (beta - alpha) / (2.0 * g)
            t = tl.where(zeta >= 0, 1.0, -1.0) / (tl.abs(zeta) + tl.sqrt(1.0 + zeta * zeta))
            c = 1.0 / tl.sqrt(1.0 + t * t)
            s = tl.where(rotate, c * t, 0.0)
            c = tl.where(rotate, c, 1.0)
            for r0 in range(0, L, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                # Pairs that do not rotate (most of them in the last sweeps) move no bytes.
                m2 = rotate[:, None] & (rows[None, :] < L)
                pa_x = x_base + ca[:, None] * STRIDE + rows[None, :]
                pb_x = x_base + cb[:, None] * STRIDE + rows[None, :]
                xa = tl.load(pa_x, mask=m2, other=0.0)
                xb = tl.load(pb_x, mask=m2, other=0.0)
                tl.store(pa_x, c[:, None] * xa - s[:, None] * xb, mask=m2)
                tl.store(pb_x, s[:, None] * xa + c[:, None] * xb, mask=m2)
                pa_v = v_base + ca[:, None] * STRIDE + rows[None, :]
                pb_v = v_base + cb[:, None] * STRIDE + rows[None, :]
                va = tl.load(pa_v, mask=m2, other=0.0)
                vb = tl.load(pb_v, mask=m2, other=0.0)
                tl.store(pa_v, c[:, None] * va - s[:, None] * vb, mask=m2)
                tl.store(pb_v, s[:, None] * va + c[:, None] * vb, mask=m2)
            # The next round reads columns other threads of this program just wrote.
            tl.debug_barrier()
        sweep += 1
    tl.store(info_ptr + 2 * b, sweep.to(tl.float32))
    tl.store(info_ptr + 2 * b + 1, off)


@triton.jit
def cholesky_kernel(
    g_ptr,
    r_ptr,
    info_ptr,
    L,
    STRIDE,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Left-looking Cholesky G = R^T R of one symmetric L x L fp64 matrix per program (reading its
    # upper triangle), R upper triangular and written a row at a time: for i >= j,
    #   c_i = G[j, i] - sum_{k<j} R[k, j] R[k, i],   R[j, i] = c_i / sqrt(c_j).
    # The pivot c_j comes out of the row's first tile (i from j), so a row is one chain of tile
    # loads over the rows above it; those rows were written by other threads of this program: a
    # barrier after each row. Rows are STRIDE apart, matrices L * STRIDE. info = 1 + the first
    # pivot that is not positive (or not finite), 0 when every one is; such a row is left zero.
    # In-matrix offsets (at most l^2) stay int32; the batch offset is int64.
    b = tl.program_id(0).to(tl.int64)
    g_base = g_ptr + b * L * STRIDE
    r_base = r_ptr + b * L * STRIDE
    info = tl.program_id(0) * 0
    for j in range(0, L):
        scale = tl.zeros((), dtype=tl.float64)
        for i0 in range(j, L, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            acc = tl.zeros((BLOCK_K, BLOCK_I), dtype=tl.float64)
            for k0 in range(0, j, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                km = k < j
                rkj = tl.load(r_base + k * STRIDE + j, mask=km, other=0.0)
                rki = tl.load(r_base + k[:, None] * STRIDE + i[None, :], mask=km[:, None] & (i[None, :] < L), other=0.0)
                acc += rkj[:, None] * rki
            c = tl.load(g_base + j * STRIDE + i, mask=i < L, other=0.0) - tl.sum(acc, axis=0)
            if i0 == j:  # the row's first tile holds its pivot
                d = tl.sum(tl.where(i == j, c, 0.0), axis=0)
                ok = d > 0.0  # false for NaN too
                info = tl.where((info == 0) & (not ok), j + 1, info)
                scale = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, d, 1.0)), 0.0)
            tl.store(r_base + j * STRIDE + i, c * scale, mask=i < L)
        tl.debug_barrier()
    tl.store(info_ptr + b, info)
