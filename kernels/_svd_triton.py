# mypy: allow-untyped-defs
"""Triton kernels of the batched randomized SVD (layer 1; imported on first launch).

- :func:`bmm_kernel`: batched ``C = A @ X`` reading ``A`` as stored (fp32 / bf16 / fp16, any
  strides, so a transposed view costs nothing), ``X`` and ``C`` fp32; :func:`split_tf32` splits
  ``X`` for its 2xTF32 products of half-precision ``A``;
- :func:`cholesky_kernel`: left-looking fp64 Cholesky of one small matrix per program;
- :func:`jacobi_kernel`: one launch of the one-sided (Hestenes) Jacobi SVD of small square
  matrices: a program per matrix runs a few sweeps on X with a per-matrix rounding floor, logging
  each round's rotations (:func:`jacobi_sweeps`), while the other programs apply the previous
  launch's rotations to V, a block of V's rows each (:func:`jacobi_replay`).
Offsets that multiply an index by a stride are int64: one matrix of a batch may pass 2^31 elements.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fasttrunc.kernels._cholqr_triton import cholesky_rows


@triton.jit
def split_tf32(x):
    # x = hi + lo exactly: hi is x rounded to tf32 (10 mantissa bits, to nearest with ties away
    # from zero, as cvt.rna.tf32.f32: add half of the dropped 13 bits' range, then clear them),
    # lo = x - hi is exact in fp32 and |lo| <= 2^-11 |x|. A tf32 MMA reads hi exactly and lo to
    # 11 significant bits: hi + lo to ~2^-21 relative.
    bits = x.to(tl.int32, bitcast=True)
    hi = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def bmm_kernel(
    a_ptr,
    x_ptr,
    c_ptr,
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
):
    # C[b] = A[b] @ X[b]; A in any float dtype and any strides (a transposed view costs
    # nothing), X fp32, accumulation and C in fp32. PRECISION is tl.dot's input precision
    # ("ieee", "tf32", "tf32x3"), or "tf32x2": fp32-grade products of an fp16 / bf16 A, whose values
    # tf32 holds exactly, as two tf32 MMAs of A with the split X (split_tf32) instead of 3xTF32's
    # three; or "fp16": an fp16 A times X rounded to fp16 in registers, one fp16 MMA (twice the
    # tf32 rate; X keeps tf32's 10 mantissa bits, in fp16's range).
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
    a_ptrs = a_ptr + b * s_ab + rm64[:, None] * s_am + rk64[None, :] * s_ak
    x_ptrs = x_ptr + b * s_xb + rk64[:, None] * s_xk + rn64[None, :] * s_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
        x = tl.load(x_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
        if PRECISION == "tf32x2":
            x_hi, x_lo = split_tf32(x)
            a32 = a.to(tl.float32)
            acc = tl.dot(a32, x_lo, acc, input_precision="tf32")
            acc = tl.dot(a32, x_hi, acc, input_precision="tf32")
        elif PRECISION == "fp16":
            acc = tl.dot(a.to(tl.float16), x.to(tl.float16), acc)
        else:
            acc = tl.dot(a.to(tl.float32), x, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * s_ak
        x_ptrs += BLOCK_K * s_xk
    # Output pointers are formed where they are stored: live across the K loop they cost
    # registers (and spills, sm_90).
    c_ptrs = c_ptr + b * s_cb + rm64[:, None] * s_cm + rn64[None, :] * s_cn
    tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def jacobi_kernel(
    x_ptr,
    v_ptr,
    info_ptr,
    log_ptr,
    count_ptr,
    floor_ptr,
    batch,
    parity,
    run_x,
    L,
    NPAIR,
    STRIDE,
    tol,
    max_sweeps,
    SWEEPS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    REPLAY_R: tl.constexpr,
    REPLAY: tl.constexpr,
):
    # One launch of the batched one-sided Jacobi SVD: programs 0 .. batch - 1 run up to SWEEPS
    # sweeps on X, one program a matrix (jacobi_sweeps, unless run_x is 0), logging their rotations
    # in log / count half `parity`; the programs after them apply the rotations the previous launch
    # logged (half 1 - parity) to V, a block of REPLAY_R rows of V a program (jacobi_replay). The
    # two halves are disjoint and neither waits for the other: V's replay of sweeps s, s + 1 runs
    # on the SMs the X programs leave idle while X runs sweeps s + 2, s + 3. REPLAY False (more
    # than 512 padded columns, where the replay's register tile spills under triton 3.6): the X
    # programs rotate V's columns beside X's, and the grid holds them only.
    pid = tl.program_id(0)
    half_log = batch.to(tl.int64) * SWEEPS * (2 * NPAIR - 1) * 2 * NPAIR
    if pid < batch:
        if run_x != 0:
            jacobi_sweeps(
                pid.to(tl.int64),
                x_ptr,
                v_ptr,
                info_ptr,
                log_ptr + parity * half_log,
                count_ptr + parity * batch,
                floor_ptr,
                L,
                NPAIR,
                STRIDE,
                tol,
                max_sweeps,
                SWEEPS,
                BLOCK_P,
                BLOCK_R,
                REPLAY,
            )
    elif REPLAY:
        blocks = tl.cdiv(STRIDE, REPLAY_R)
        q = pid - batch
        jacobi_replay(
            (q // blocks).to(tl.int64),
            q % blocks,
            v_ptr,
            log_ptr + (1 - parity) * half_log,
            count_ptr + (1 - parity) * batch,
            NPAIR,
            STRIDE,
            SWEEPS,
            BLOCK_C,
            REPLAY_R,
        )


@triton.jit
def jacobi_sweeps(
    b,
    x_ptr,
    v_ptr,
    info_ptr,
    log_ptr,
    count_ptr,
    floor_ptr,
    L,
    NPAIR,
    STRIDE,
    tol,
    max_sweeps,
    SWEEPS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LOG: tl.constexpr,
):
    # One-sided (Hestenes) Jacobi on the columns of matrix b, an N x N matrix, N = 2*NPAIR, up
    # to SWEEPS sweeps a launch (the launcher repeats launches up to max_sweeps in all).
    # Buffers hold the transpose (row j = column j, contiguous) so a column loads coalesced; rows
    # are STRIDE floats apart, a multiple of 32, so that the loads are 128 bits wide for any l.
    # L is the number of row entries processed: the launcher passes STRIDE (the padding is zero
    # in x and rotations keep it zero), so masks stay 128-bit aligned too.
    # Round-robin ordering: each round rotates NPAIR disjoint column pairs at once; N - 1
    # rounds make a sweep in which every pair meets once. Sweeps repeat until no pair has
    # |a_p . a_q| > tol * |a_p| |a_q| (or max_sweeps). Pairs whose inner product is below this
    # matrix's rounding floor (eps^2 |R|_F^2, read per matrix) are left alone.
    # LOG: only X is rotated here: each round's (c, s) per pair goes to the log (c = 1, s = 0 for a
    # pair left alone), and jacobi_replay applies them to V, rows of V in parallel; else V's
    # columns are rotated here beside X's (count still says how many sweeps ran). info holds
    # (sweeps so far, the last sweep's largest off-diagonal ratio) across launches; count gets the
    # sweeps this launch ran (0 once converged or out of sweeps).
    floor = tl.load(floor_ptr + b)
    n_cols = 2 * NPAIR
    x_base = x_ptr + b * n_cols * STRIDE
    v_base = v_ptr + b * n_cols * STRIDE
    log_base = log_ptr + b * SWEEPS * (n_cols - 1) * 2 * NPAIR
    i = tl.arange(0, BLOCK_P)
    pmask = i < NPAIR
    sweep = tl.load(info_ptr + 2 * b).to(tl.int32)
    off = tl.load(info_ptr + 2 * b + 1)
    here = sweep * 0
    while (here < SWEEPS) & (sweep < max_sweeps) & (off > tol):
        off = tol * 0.0
        for r in range(0, n_cols - 1):
            pb = n_cols - 1 - i
            ca = tl.where(i == 0, 0, (i - 1 + r) % (n_cols - 1) + 1)
            cb = (pb - 1 + r) % (n_cols - 1) + 1
            # Elementwise sums over the row chunks, reduced across the rows once after the loop:
            # 3 cross-row reductions a round instead of 3 a chunk (18 chunks at l = 266).
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
            if LOG:
                round_log = log_base + (here * (n_cols - 1) + r) * 2 * NPAIR
                tl.store(round_log + i, c, mask=pmask)
                tl.store(round_log + NPAIR + i, s, mask=pmask)
            for r0 in range(0, L, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                # Pairs that do not rotate (most of them in the last sweeps) move no bytes.
                m2 = rotate[:, None] & (rows[None, :] < L)
                rotate_rows(x_base, ca, cb, rows, STRIDE, c, s, m2)
                if not LOG:  # V's columns here, not in the replay
                    rotate_rows(v_base, ca, cb, rows, STRIDE, c, s, m2)
            # The next round reads columns other threads of this program just wrote.
            tl.debug_barrier()
        sweep += 1
        here += 1
    tl.store(count_ptr + b, here)
    tl.store(info_ptr + 2 * b, sweep.to(tl.float32))
    tl.store(info_ptr + 2 * b + 1, off)


@triton.jit
def rotate_rows(base, ca, cb, rows, STRIDE, c, s, mask):
    # Columns (ca, cb) of each pair -> (c a - s b, s a + c b), on these rows (buffer rows STRIDE apart).
    pa = base + ca[:, None] * STRIDE + rows[None, :]
    pb = base + cb[:, None] * STRIDE + rows[None, :]
    a = tl.load(pa, mask=mask, other=0.0)
    b = tl.load(pb, mask=mask, other=0.0)
    tl.store(pa, c[:, None] * a - s[:, None] * b, mask=mask)
    tl.store(pb, s[:, None] * a + c[:, None] * b, mask=mask)


@triton.jit
def jacobi_replay(
    b,
    block,
    v_ptr,
    log_ptr,
    count_ptr,
    NPAIR,
    STRIDE,
    SWEEPS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # V <- V J for the rotations jacobi_sweeps logged for matrix b (count[b] sweeps of N - 1
    # rounds, N = 2 * NPAIR, m1 = N - 1). A rotation mixes two columns of V row by row, so the
    # rows are independent: this program holds BLOCK_R rows of V (the buffer's entries of `block`,
    # all N columns: row j of the buffer is column j of V) in registers through every round, and
    # reads V once and writes it once a launch.
    # In round r, pair i is columns ca = (i ? (i - 1 + r) % m1 + 1 : 0), cb = (N - 2 - i + r) % m1 + 1
    # (jacobi_kernel's order). Per column j >= 1 that inverts to d = (j - 1 - r) mod m1: j is ca of
    # pair d + 1 when d + 1 < NPAIR, its partner cb = pa + 1 with pa = (N - 3 - d + r) mod m1; else
    # j is cb of pair e = (m1 - j + r) mod m1, its partner ca = 0 for e = 0, else q + 1 with
    # q = (e - 1 + r) mod m1. Column 0 is ca of pair 0, partner z + 1 with z = (N - 2 + r) mod m1.
    # Each round moves d by -1, e and z by +1, pa and q by +2 (mod m1): kept as counters with a
    # conditional wrap, no integer division in the loop. Column j becomes c V[:, j] -+ s V[:, partner]
    # (- for ca); padding columns keep themselves. The next round's (c, s) are loaded before this
    # round's update (they do not depend on it).
    n_cols = 2 * NPAIR
    m1 = n_cols - 1
    count = tl.load(count_ptr + b)
    if count > 0:
        j = tl.arange(0, BLOCK_C)
        live = j < n_cols
        e_rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = live[:, None] & (e_rows[None, :] < STRIDE)
        ptrs = v_ptr + b * n_cols * STRIDE + j[:, None] * STRIDE + e_rows[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0)
        log_base = log_ptr + b * SWEEPS * m1 * 2 * NPAIR
        # The counters at r = 0 (j >= 1 for d, e, pa, q; column 0 uses z).
        d = (j - 1 + m1) % m1
        e = (m1 - j % m1) % m1
        pa = (n_cols - 3 - d + m1) % m1
        q = (e - 1 + m1) % m1
        z = (n_cols - 2) % m1
        rounds = count * m1
        for t in range(0, rounds):
            is_a = (j == 0) | (d + 1 < NPAIR)
            pair = tl.where(j == 0, 0, tl.where(is_a, d + 1, e))
            partner = tl.where(j == 0, z + 1, tl.where(is_a, pa + 1, tl.where(e == 0, 0, q + 1)))
            partner = tl.where(live, partner, j)
            round_log = log_base + t * 2 * NPAIR
            c = tl.load(round_log + pair, mask=live, other=1.0)
            s = tl.load(round_log + NPAIR + pair, mask=live, other=0.0)
            s = tl.where(is_a, -s, s)
            other = tl.gather(v, tl.broadcast_to(partner[:, None], (BLOCK_C, BLOCK_R)), axis=0)
            v = c[:, None] * v + s[:, None] * other
            # The next round's counters (and a new sweep starts the pattern over: r = t + 1 mod m1).
            d = tl.where(d == 0, m1 - 1, d - 1)
            e = tl.where(e == m1 - 1, 0, e + 1)
            pa = tl.where(pa + 2 >= m1, pa + 2 - m1, pa + 2)
            q = tl.where(q + 2 >= m1, q + 2 - m1, q + 2)
            z = tl.where(z == m1 - 1, 0, z + 1)
        tl.store(ptrs, v, mask=mask)


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
    # Left-looking Cholesky G = R^T R of one symmetric L x L fp64 matrix per program (its upper
    # triangle read), R upper and written a row at a time (cholesky_rows, shared with CholeskyQR's
    # step kernel). Rows are STRIDE apart, matrices L * STRIDE. info = 1 + the first pivot that is
    # not positive (or not finite), 0 when every one is; such a row is left zero.
    b = tl.program_id(0).to(tl.int64)
    info, _, _, _ = cholesky_rows(g_ptr + b * L * STRIDE, r_ptr + b * L * STRIDE, 0.0, L, STRIDE, BLOCK_I, BLOCK_K)
    tl.store(info_ptr + b, info)
