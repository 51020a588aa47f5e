# mypy: allow-untyped-defs
"""Triton kernels of the low-rank linear ``y = (x @ a.T) @ b.T + bias`` (layer 1; imported on first launch).

- :func:`lowrank_tiled_kernel` (by the rules, M > decode_max_m): each program keeps its ``BLOCK_M x R`` tile of
  ``h = x @ a.T`` in fp32 registers over the whole ``in`` loop, casts it once and loops over its
  share of the ``out`` tiles; ``h`` never leaves the chip and ``x`` is read once.
- split-K (by the rules, M <= decode_max_m), two launches with nothing shared between launches:
  :func:`lowrank_shrink_kernel` programs each reduce one ``in`` chunk of ``x @ a.T`` for one M
  tile into an fp32 partial of a workspace allocated for this launch; then
  :func:`lowrank_expand_kernel` programs sum every split's partial in a fixed order (deterministic),
  ``SPLIT_BLOCK`` partials per load so that the loads are in flight together, cast once and stream
  their share of the ``out`` tiles of ``b``. The launches are ordered by the stream: no counters,
  no program waits on another, so concurrent launches on other streams, graph replays and threads
  cannot interfere, and nothing can hang. On sm_90+ (``GDC``) the expand grid is launched with
  programmatic dependent launch: the shrink signals early, the expand's first instruction is the
  grid-dependency wait, so the launch gap overlaps the shrink's tail and ordering is unchanged.

Precision: both products accumulate in fp32; ``H_FP32`` keeps the intermediate in fp32 (fp16 and
fp32 operands), else it is cast once to the operands' dtype (bf16). Row offsets are int64: a row
index times a row stride passes 2^31 for M x in beyond 2^31 elements.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _first_product(
    x_ptr,
    a_ptr,
    rows,
    M,
    k_lo,
    k_hi,
    stride_xm,
    stride_ar,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    PREC1: tl.constexpr,
):
    # h[BLOCK_M, R_PAD] = x[rows, k_lo:k_hi] @ a[:, k_lo:k_hi].T, accumulated in fp32.
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    r_ok = offs_r < R
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    a_rows = a_ptr + offs_r[None, :].to(tl.int64) * stride_ar
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < k_hi
        xt = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_rows + ks[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        h = tl.dot(xt, at, h, input_precision=PREC1)
    return h


@triton.jit
def _cast_h(h, y_ptr, H_FP32: tl.constexpr):
    if H_FP32:
        hc = h
    else:
        hc = h.to(y_ptr.dtype.element_ty)  # the one cast of the intermediate
    return hc


@triton.jit
def _second_product(
    h,
    b_ptr,
    bias_ptr,
    y_ptr,
    rows,
    M,
    N,
    R,
    stride_bn,
    stride_ym,
    group,
    n_groups,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    H_FP32: tl.constexpr,
    PREC2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # y[rows, n] = h @ b[n, :].T (+ bias[n]) for the out tiles group, group + n_groups, ...
    hc = _cast_h(h, y_ptr, H_FP32)
    offs_r = tl.arange(0, R_PAD)
    r_ok = (offs_r < R)[:, None]
    y_rows = y_ptr + rows[:, None].to(tl.int64) * stride_ym
    row_ok = (rows < M)[:, None]
    for n0 in range(group * BLOCK_N, N, n_groups * BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        # The (R_PAD, BLOCK_N) tile b[cols, :].T, upcast to fp32 when h stays fp32.
        bt = tl.load(
            b_ptr + cols[None, :].to(tl.int64) * stride_bn + offs_r[:, None], mask=r_ok & col_ok[None, :], other=0.0
        )
        if H_FP32:
            bt = bt.to(tl.float32)
        acc = tl.dot(hc, bt, input_precision=PREC2)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=row_ok & col_ok[None, :])


@triton.jit
def lowrank_tiled_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    M,
    K,
    N,
    R,
    stride_xm,
    stride_ar,
    stride_bn,
    stride_ym,
    N_GROUPS,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    H_FP32: tl.constexpr,
    PREC1: tl.constexpr,
    PREC2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    # Column groups of one M tile are adjacent program ids: they run together and share the x
    # tile through L2.
    m_tile = pid // N_GROUPS
    group = pid % N_GROUPS
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    h = _first_product(x_ptr, a_ptr, rows, M, 0, K, stride_xm, stride_ar, R, BLOCK_M, BLOCK_K, R_PAD, PREC1)
    _second_product(
        h,
        b_ptr,
        bias_ptr,
        y_ptr,
        rows,
        M,
        N,
        R,
        stride_bn,
        stride_ym,
        group,
        N_GROUPS,
        BLOCK_N,
        R_PAD,
        H_FP32,
        PREC2,
        HAS_BIAS,
    )


@triton.jit
def lowrank_shrink_kernel(
    x_ptr,
    a_ptr,
    ws_ptr,
    M,
    K,
    R,
    stride_xm,
    stride_ar,
    N_SPLIT,
    K_CHUNK,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    PREC1: tl.constexpr,
    WS_ROWS: tl.constexpr,
    GDC: tl.constexpr = False,
):
    # Program (m_tile, split) writes the fp32 partial x[rows, chunk] @ a[:, chunk].T into the
    # workspace laid out [n_m, N_SPLIT, WS_ROWS, R_PAD]: its first WS_ROWS rows (1 for M = 1,
    # else all BLOCK_M, rows past M as zeros), the rows the expand kernel sums.
    pid = tl.program_id(0)
    m_tile = pid // N_SPLIT
    split = pid % N_SPLIT
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = split * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, K)
    h = _first_product(x_ptr, a_ptr, rows, M, k_lo, k_hi, stride_xm, stride_ar, R, BLOCK_M, BLOCK_K, R_PAD, PREC1)
    if GDC:
        # The expand grid (launched with programmatic dependent launch) may start being scheduled
        # now; its gdc_wait still waits for this whole grid and its stores.
        tl.extra.cuda.gdc_launch_dependents()
    slot = ws_ptr + pid.to(tl.int64) * (WS_ROWS * R_PAD)
    local = tl.arange(0, BLOCK_M)[:, None]
    offsets = slot + local * R_PAD + tl.arange(0, R_PAD)[None, :]
    if WS_ROWS == BLOCK_M:
        tl.store(offsets, h)
    else:
        tl.store(offsets, h, mask=local < WS_ROWS)


@triton.jit
def lowrank_expand_kernel(
    ws_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    R,
    stride_bn,
    stride_ym,
    N_SPLIT,
    N_GROUPS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    WS_ROWS: tl.constexpr,
    H_FP32: tl.constexpr,
    PREC2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GDC: tl.constexpr = False,
):
    # Program (m_tile, group): h = sum of the M tile's N_SPLIT partials, then its out tiles.
    if GDC:
        # Launched with programmatic dependent launch: wait for the shrink grid (and its stores to
        # the workspace) before any read. Everything before the shrink finished before it started.
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    m_tile = pid // N_GROUPS
    group = pid % N_GROUPS
    offs_s = tl.arange(0, SPLIT_BLOCK)
    base = ws_ptr + m_tile.to(tl.int64) * N_SPLIT * (WS_ROWS * R_PAD)
    # The WS_ROWS written rows of each partial (1 for M = 1, else the whole tile), SPLIT_BLOCK
    # partials in one load: independent L2 reads in flight together.
    tile = tl.arange(0, WS_ROWS)[:, None] * R_PAD + tl.arange(0, R_PAD)[None, :]
    acc = tl.zeros((WS_ROWS, R_PAD), dtype=tl.float32)
    for s0 in range(0, N_SPLIT, SPLIT_BLOCK):
        splits = s0 + offs_s
        parts = tl.load(
            base + splits[:, None, None] * (WS_ROWS * R_PAD) + tile[None, :, :],
            mask=(splits < N_SPLIT)[:, None, None],
            other=0.0,
        )
        acc += tl.sum(parts, axis=0)
    if WS_ROWS == BLOCK_M:
        h = acc
    else:  # one row: the rest of the M tile is zero
        h = tl.where(tl.arange(0, BLOCK_M)[:, None] < WS_ROWS, acc, 0.0)
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    _second_product(
        h,
        b_ptr,
        bias_ptr,
        y_ptr,
        rows,
        M,
        N,
        R,
        stride_bn,
        stride_ym,
        group,
        N_GROUPS,
        BLOCK_N,
        R_PAD,
        H_FP32,
        PREC2,
        HAS_BIAS,
    )
