# mypy: allow-untyped-defs
"""Triton kernels of one CholeskyQR step (layer 1; imported on the first launch).

A step of CholeskyQR on a batch ``Q (B, m, l)`` is four launches, whatever the batch holds:
- :func:`gram_kernel`: ``G = Q^T Q``, only the tiles on and above the diagonal (the factorization
  reads the upper triangle), nothing for a matrix that has settled;
- :func:`cholqr_step_kernel`: one program per matrix: the fp64 Cholesky ``G (+ s I) = R^T R``,
  the convergence test and the per-matrix state machine (converged, failed, shift next step);
- :func:`upper_inverse_kernel`: ``R^-1`` in fp64 (written in fp32 for the update), a block of
  columns per program, and the loose convergence test (its condition number);
- :func:`trmm_inplace_kernel`: ``Q <- Q R^-1`` in place, skipping the triangle of zeros and every
  matrix the step leaves alone (no copy: its Q is already where it belongs).
The matrix state is an int32 of bits (``STATE_*`` in kernels/svd.py: 1 converged, 2 failed,
4 factor the shifted Gram). Offsets that multiply a row index by a stride are int64 in the two
kernels that walk Q (one matrix may pass 2^31 elements); the small l x l matrices stay int32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cholesky_rows(g_base, r_base, shift, L, STRIDE, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    # Left-looking Cholesky (G + shift I) = R^T R of one symmetric L x L matrix (its upper triangle
    # read, in any float dtype, and computed in fp64), R upper and written a row at a time: for i >= j,
    #   c_i = G[j, i] + shift [i == j] - sum_{k<j} R[k, j] R[k, i],   R[j, i] = c_i / sqrt(c_j).
    # The pivot c_j comes out of the row's first tile (i from j), so a row is one chain of tile
    # loads over the rows above it; those rows were written by other threads of this program: a
    # barrier after each row. Rows are STRIDE apart. Returns info (1 + the first pivot that is not
    # positive or not finite, 0 if none; such a row is left zero), whether every entry of R is
    # finite, max |R - I| and |R|_F^2.
    info = tl.program_id(0) * 0
    finite = info == 0
    dev = tl.zeros((), dtype=tl.float64)
    fro = tl.zeros((), dtype=tl.float64)
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
            gji = tl.load(g_base + j * STRIDE + i, mask=i < L, other=0.0).to(tl.float64)
            c = gji + tl.where(i == j, shift, 0.0) - tl.sum(acc, axis=0)
            if i0 == j:  # the row's first tile holds its pivot
                d = tl.sum(tl.where(i == j, c, 0.0), axis=0)
                ok = d > 0.0  # false for NaN too
                info = tl.where((info == 0) & (not ok), j + 1, info)
                scale = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, d, 1.0)), 0.0)
            row = tl.where(i < L, c * scale, 0.0)
            finite = finite & (tl.sum(tl.where(row - row == 0.0, 0, 1), axis=0) == 0)  # inf - inf is NaN
            dev = tl.maximum(dev, tl.max(tl.abs(row - tl.where(i == j, 1.0, 0.0)), axis=0))
            fro += tl.sum(row * row, axis=0)
            tl.store(r_base + j * STRIDE + i, row, mask=i < L)
        tl.debug_barrier()
    return info, finite, dev, fro


@triton.jit
def cholqr_step_kernel(
    g_ptr,
    state_ptr,
    coef_ptr,
    r_ptr,
    hold_ptr,
    aux_ptr,
    L,
    done_tol,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per matrix b of the batch: the factorization of a CholeskyQR step.
    #   state bit 1 converged, 2 failed: settled, the step leaves it alone (hold = 1, nothing read);
    #   bit 4: the plain Gram was indefinite last step, so factor G + s I, s = coef * trace(G).
    # A factorization that breaks down (a pivot not positive, or R not finite) holds the matrix and
    # sets bit 4 for the next step, or fails it if the Gram was already shifted or has no positive
    # trace. Otherwise hold = 0 (upper_inverse_kernel and the update follow) and the matrix has
    # converged when max |R - I| <= done_tol; aux gets |R|_F^2 for the loose test of the inverse
    # kernel, or +inf after a shifted Gram (Q = Y R^-1 can then be far from orthonormal, and only a
    # plain step may accept it loosely).
    b = tl.program_id(0).to(tl.int64)
    state = tl.load(state_ptr + b)
    if (state & 3) != 0:
        tl.store(hold_ptr + b, 1)
    else:
        g_base = g_ptr + b * L * L
        shifting = (state & 4) != 0
        trace = tl.zeros((), dtype=tl.float64)
        for i0 in range(0, L, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            trace += tl.sum(tl.load(g_base + i * L + i, mask=i < L, other=0.0).to(tl.float64), axis=0)
        shift = tl.load(coef_ptr + b) * trace
        info, finite, dev, fro = cholesky_rows(
            g_base, r_ptr + b * L * L, tl.where(shifting, shift, 0.0), L, L, BLOCK_I, BLOCK_K
        )
        if (info != 0) | (not finite):
            tl.store(hold_ptr + b, 1)
            tl.store(state_ptr + b, tl.where(shifting | (shift <= 0.0), 2, 4))
        else:
            tl.store(hold_ptr + b, 0)
            tl.store(state_ptr + b, tl.where(dev <= done_tol, 1, 0))
            tl.store(aux_ptr + b, tl.where(shifting, float("inf"), fro))


@triton.jit
def upper_inverse_kernel(
    r_ptr,
    x_ptr,
    rinv_ptr,
    hold_ptr,
    state_ptr,
    aux_ptr,
    sums_ptr,
    tickets_ptr,
    L,
    kappa_max,
    LOOSE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # X = R^-1 of an upper triangular L x L fp64 R with a positive diagonal, for matrices with
    # hold == 0; program (b, J) solves R X[:, J] = I[:, J] for its BLOCK_J columns by back
    # substitution, a row at a time from the block's last column e: X[i, j] = ([i == j] -
    # sum_{i<k<e} R[i, k] X[k, j]) / R[i, i] (rows below written by this program: a barrier after
    # each). The columns are independent, so the blocks of a matrix run side by side and a
    # program's chain is its own rows only. X goes to x_ptr (fp64, which the chain reads) and to
    # rinv_ptr (fp32, for the update); zeros below the diagonal are written too.
    # LOOSE: the matrix has also converged when kappa_F(R) = |R|_F |X|_F <= kappa_max, |R|_F^2 in
    # aux. Each block adds its |X[:, J]|_F^2 to sums[b] and takes a ticket; the last block of the
    # matrix (no program waits for another) reads the sum, decides, and resets sums and tickets.
    b = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1)
    if tl.load(hold_ptr + b) == 0:
        r_base = r_ptr + b * L * L
        x_base = x_ptr + b * L * L
        j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        end = tl.minimum(L, pid_j * BLOCK_J + BLOCK_J)
        fro = tl.zeros((), dtype=tl.float64)
        for t in range(0, end):
            i = end - 1 - t
            inv_d = 1.0 / tl.load(r_base + i * L + i)
            acc = tl.zeros((BLOCK_K, BLOCK_J), dtype=tl.float64)
            for k0 in range(i + 1, end, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                km = k < end
                rik = tl.load(r_base + i * L + k, mask=km, other=0.0)
                xkj = tl.load(x_base + k[:, None] * L + j[None, :], mask=km[:, None] & (j[None, :] < L), other=0.0)
                acc += rik[:, None] * xkj
            row = tl.where(j == i, inv_d, tl.where(j > i, -tl.sum(acc, axis=0) * inv_d, 0.0))
            row = tl.where(j < L, row, 0.0)
            fro += tl.sum(row * row, axis=0)
            tl.store(x_base + i * L + j, row, mask=j < L)
            tl.store(rinv_ptr + b * L * L + i * L + j, row.to(tl.float32), mask=j < L)
            tl.debug_barrier()
        if LOOSE:
            tl.atomic_add(sums_ptr + b, fro.to(tl.float32))  # fp32: a test against 2^12 (inf is a no)
            ticket = tl.atomic_add(tickets_ptr + b, 1)
            if ticket == tl.num_programs(1) - 1:
                total = tl.atomic_add(sums_ptr + b, 0.0)  # every other block's sum is in (acq_rel)
                tl.store(sums_ptr + b, 0.0)  # no other program touches them any more this step
                tl.store(tickets_ptr + b, 0)
                if tl.sqrt(tl.load(aux_ptr + b) * total.to(tl.float64)) <= kappa_max:
                    tl.store(state_ptr + b, 1)


@triton.jit
def gram_kernel(
    q_ptr,
    g_ptr,
    state_ptr,
    M,
    L,
    s_qb,
    s_qm,
    s_ql,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # G[b] = Q[b]^T Q[b] (fp32, L x L contiguous), the tiles on and above the diagonal only, for
    # matrices whose state is not settled (bits 1 | 2); the rest of G is left as it was.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles = tl.cdiv(L, BLOCK_N)
    pid_i = pid // tiles
    pid_j = pid % tiles
    settled = (tl.load(state_ptr + b) & 3) != 0
    if (pid_i <= pid_j) & (not settled):
        ri = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rk64 = rk.to(tl.int64)
        a_ptrs = q_ptr + b * s_qb + rk64[None, :] * s_qm + ri[:, None] * s_ql  # Q^T tile (BLOCK_N, BLOCK_K)
        x_ptrs = q_ptr + b * s_qb + rk64[:, None] * s_qm + rj[None, :] * s_ql  # Q tile (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, M, BLOCK_K):
            a = tl.load(a_ptrs, mask=(ri[:, None] < L) & (rk[None, :] + k0 < M), other=0.0)
            x = tl.load(x_ptrs, mask=(rk[:, None] + k0 < M) & (rj[None, :] < L), other=0.0)
            acc = tl.dot(a, x, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * s_qm
            x_ptrs += BLOCK_K * s_qm
        tl.store(g_ptr + b * L * L + ri[:, None] * L + rj[None, :], acc, mask=(ri[:, None] < L) & (rj[None, :] < L))


@triton.jit
def trmm_inplace_kernel(
    q_ptr,
    rinv_ptr,
    hold_ptr,
    M,
    L,
    s_qb,
    s_qm,
    s_ql,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Q[b] <- Q[b] X[b] in place for an upper triangular X (fp32, L x L contiguous, zero below the
    # diagonal), skipping matrices with hold[b] != 0. One program owns BLOCK_M rows of Q and walks
    # their column tiles from the last: column j of the result reads columns k <= j only, so a tile
    # reads nothing an earlier (further right) tile of this program overwrote, and its own columns
    # are all loaded before the product that replaces them is stored. The zero triangle of X is
    # skipped (the K loop of the tile ending at column e stops at e).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if tl.load(hold_ptr + b) == 0:
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        q_rows = q_ptr + b * s_qb + rm.to(tl.int64)[:, None] * s_qm
        tiles = tl.cdiv(L, BLOCK_N)
        for t in range(0, tiles):
            n0 = (tiles - 1 - t) * BLOCK_N
            rn = n0 + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            a_ptrs = q_rows + rk[None, :] * s_ql
            x_ptrs = rinv_ptr + b * L * L + rk[:, None] * L + rn[None, :]
            for k0 in range(0, n0 + BLOCK_N, BLOCK_K):
                a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < L), other=0.0)
                x = tl.load(x_ptrs, mask=(rk[:, None] + k0 < L) & (rn[None, :] < L), other=0.0)
                acc = tl.dot(a, x, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * s_ql
                x_ptrs += BLOCK_K * L
            tl.store(q_rows + rn[None, :] * s_ql, acc, mask=(rm[:, None] < M) & (rn[None, :] < L))
