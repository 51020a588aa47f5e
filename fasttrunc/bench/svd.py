"""Benchmark of the batched randomized SVD against torch, on the weight shapes of Pythia MLPs (CUDA).

Every case factorizes a set of matrices with a prescribed slowly decaying spectrum
(``sigma_i = i^-0.5``, like trained weights), so the optimal rank-k error is known exactly, and
times in the same run, on the same card:
- fasttrunc, ``n_iter=2, oversample=10`` (the settings of the torch baseline), with the range
  passes on tf32 (the default) and in IEEE fp32, and at fasttrunc's defaults; on CUDA the first of
  them also captured in a CUDA graph and replayed (no host sync inside it);
- ``torch.svd_lowrank(q=k+10, niter=2)`` looped over the matrices (LASER's routine, oversampled);
- plain-torch batched randomized SVD (bmm + Householder ``linalg.qr``, the CPU path run on CUDA);
- ``torch.linalg.svd`` of every matrix (once per matrix set: it does not depend on k);
plus bf16-stored weights, and a breakdown of one fasttrunc call into its stages.
Times are medians of ``reps`` timed calls after one warm-up, with ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.runs import Progress, ResultMixin, report, synchronize

# name -> list of (count, m, n): the MLP matrices of one model.
MATRIX_SETS = {
    "pythia-1.4b-mlp": [(24, 8192, 2048), (24, 2048, 8192)],
    "pythia-12b-mlp": [(4, 20480, 5120)],
}
QUICK_SETS = {"pythia-1.4b-mlp-x4": [(4, 8192, 2048), (4, 2048, 8192)]}
# Small enough for Triton's CPU interpreter: checks the benchmark itself, not the speed.
TINY_SETS = {"tiny": [(2, 48, 40), (1, 40, 56)]}


@dataclasses.dataclass(frozen=True)
class SvdBenchConfig:
    """The matrix sets, ranks and timing settings; validated on construction (one-line ValueError)."""

    sets: tuple[str, ...] = ("pythia-1.4b-mlp", "pythia-12b-mlp")
    ranks: tuple[int, ...] = (64, 256)
    reps: int = 3
    bf16: bool = True
    full_svd: bool = True
    seed: int = 0
    device: str = "cuda"
    oversample: int = 10  # of every sketch compared (torch's too): l = k + oversample columns
    defaults_variant: bool = True  # also time fasttrunc at its own defaults (n_iter, oversample)

    def __post_init__(self) -> None:
        known = MATRIX_SETS | QUICK_SETS | TINY_SETS
        for name in checks.non_empty("sets", self.sets):
            checks.choice("matrix set", name, known)
        for k in checks.non_empty("ranks", self.ranks):
            checks.integer("rank", k, 1, 1024)
        checks.integer("reps", self.reps, 1, 100)
        checks.seed("seed", self.seed)
        checks.integer("oversample", self.oversample, 1, 256)


@dataclasses.dataclass
class SvdBenchResult(ResultMixin):
    config: SvdBenchConfig
    device: str
    rows: list[dict[str, Any]]
    stages: list[dict[str, Any]]


def _spectrum_matrices(
    count: int, m: int, n: int, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` fp32 ``m x n`` matrices ``U diag(i^-0.5) V^T`` on ``device``, and the spectrum."""
    r = min(m, n)
    sigma = torch.arange(1, r + 1, dtype=torch.float64, device=device).pow(-0.5)
    out = torch.empty(count, m, n, dtype=torch.float32, device=device)
    for i in range(count):
        u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, device="cpu", dtype=torch.float32).to(device))
        v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, device="cpu", dtype=torch.float32).to(device))
        out[i] = (u * sigma.float()) @ v.mT
    return out, sigma


def _sync_all() -> None:
    if torch.cuda.is_available():
        synchronize("cuda")


def _timed(fn: Callable[[], Any], reps: int, warmup: bool = True) -> tuple[float, Any]:
    """Median seconds of ``reps`` calls (after one warm-up call unless ``warmup=False``), and the last result."""
    if warmup:
        fn()
        _sync_all()
    times = []
    for _ in range(reps):
        _sync_all()
        start = time.perf_counter()
        out = fn()
        _sync_all()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _error_ratio(groups: list[torch.Tensor], factors: list[tuple], optimal: list[float]) -> float:
    """Worst ``|W - U S Vh|_F / optimal`` over every matrix (computed in fp32 on the device)."""
    worst = 0.0
    for w, (u, s, vh), opt in zip(groups, factors, optimal):
        for i in range(w.shape[0]):
            approx = (u[i].float() * s[i].float()) @ vh[i].float()
            worst = max(worst, torch.linalg.matrix_norm(w[i].float() - approx).item() / opt)
    return worst


def _sketch_variants(k: int, os_: int, with_defaults: bool) -> list[tuple[str, dict[str, Any]]]:
    from fasttrunc.svd import DEFAULT_N_ITER, default_oversample

    variants = [
        (f"fasttrunc n_iter=2 os={os_} (tf32 range)", {"n_iter": 2, "oversample": os_, "range_precision": "tf32"}),
        (f"fasttrunc n_iter=2 os={os_} (fp32 range)", {"n_iter": 2, "oversample": os_, "range_precision": "ieee"}),
    ]
    if with_defaults:
        defaults = {"n_iter": DEFAULT_N_ITER, "oversample": default_oversample(k), "range_precision": "tf32"}
        variants.append((f"fasttrunc defaults n_iter={DEFAULT_N_ITER} os={default_oversample(k)}", defaults))
    return variants


def _stage_times(w: torch.Tensor, k: int, os_: int, reps: int) -> list[dict[str, Any]]:
    """One fasttrunc call split into its stages, on one batch of same-shape matrices."""
    from fasttrunc.kernels import svd as svd_kernels
    from fasttrunc.kernels.svd import batched_cholesky, batched_matmul, cholesky_qr, jacobi_svd

    batch, m, n = w.shape
    if m < n:
        w = w.mT
        m, n = n, m
    l = k + os_
    g = torch.randn(batch, n, l, device=w.device)
    y = batched_matmul(w, g, "tf32")
    q, _ = cholesky_qr(y)
    _, r = cholesky_qr(batched_matmul(w.mT, q, "ieee"))
    # One CholeskyQR step of Y's on its own: the Gram's upper tiles, the factorization and inverse
    # (state reset each time, so every matrix works), the in-place update (on a copy).
    coef = torch.full((batch,), 1e-3, dtype=torch.float64, device=w.device)
    buffers = svd_kernels._StepBuffers(batch, l, coef, w.device)
    svd_kernels._gram_upper(y, buffers.g, buffers.state)
    gram = (y.double().mT @ y.double()).contiguous()
    target = y.clone()
    working = torch.zeros(batch, dtype=torch.uint8, device=w.device)

    def factor() -> None:
        buffers.state.zero_()
        svd_kernels._cholqr_step(buffers, False)

    shape = f"{batch}x{m}x{n}"
    step = f"CholeskyQR step of {batch}x{m}x{l}"
    stages = [
        ("one pass W @ G, tf32", lambda: batched_matmul(w, g, "tf32")),
        ("one pass W @ G, fp32", lambda: batched_matmul(w, g, "ieee")),
        ("one pass W @ G, 3xTF32", lambda: batched_matmul(w, g, "tf32x3")),
        ("one pass W @ G, torch bmm fp32", lambda: torch.bmm(w, g)),
        (f"CholeskyQR of {batch}x{m}x{l}", lambda: cholesky_qr(y)),
        (f"Householder linalg.qr of {batch}x{m}x{l}", lambda: torch.linalg.qr(y)),
        (f"{step}: Gram, upper tiles", lambda: svd_kernels._gram_upper(y, buffers.g, buffers.state)),
        (f"{step}: fp64 Cholesky + inverse", factor),
        (f"{step}: in-place update", lambda: svd_kernels._update_in_place(target, buffers.rinv, working)),
        (f"fp64 Cholesky of {batch}x{l}x{l}, batched_cholesky", lambda: batched_cholesky(gram)),
        (f"fp64 Cholesky of {batch}x{l}x{l}, torch.linalg.cholesky_ex", lambda: torch.linalg.cholesky_ex(gram)),
        (f"Jacobi SVD of {batch}x{l}x{l}", lambda: jacobi_svd(r.float())),
        (f"torch.linalg.svd of {batch}x{l}x{l}", lambda: torch.linalg.svd(r.float())),
    ]
    rows = []
    for name, fn in stages:
        seconds, _ = _timed(fn, reps)
        rows.append({"shape": shape, "k": k, "stage": name, "ms": 1e3 * seconds})
    _, _, _, sweeps = jacobi_svd(r.float())
    rows.append({"shape": shape, "k": k, "stage": "Jacobi sweeps (max over batch)", "ms": float(sweeps.max().item())})
    return rows


Factors = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _ours(weights: Sequence[torch.Tensor], k: int, options: dict[str, Any], seed: int) -> Factors:
    """fasttrunc on a whole matrix set in one call, as truncated_svd's list form makes it."""
    from fasttrunc.kernels.svd import randomized_svd_triton_many

    generator = torch.Generator(device=weights[0].device).manual_seed(seed)
    return randomized_svd_triton_many(**_many_kwargs(weights, k, options), generator=generator)


def _many_kwargs(weights: Sequence[torch.Tensor], k: int, options: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a list-form call on a whole matrix set, but for the generator."""
    n = len(weights)
    return {
        "ws": list(weights),
        "ks": [k] * n,
        "n_iter": options["n_iter"],
        "oversamples": [options["oversample"]] * n,
        "range_precision": options.get("range_precision", "tf32"),
    }


def _graph_replay(weights: Sequence[torch.Tensor], k: int, options: dict[str, Any]) -> Callable[[], Factors]:
    """fasttrunc's sync-free form captured once in a CUDA graph; the callable replays it.

    The sketch comes from the default CUDA generator (capture-safe: each replay draws anew). After
    the first replay the flags of every matrix are checked: a flagged one is an error, not a timing.
    """
    from fasttrunc.kernels.svd import randomized_svd_triton_many_ex

    call = functools.partial(randomized_svd_triton_many_ex, **_many_kwargs(weights, k, options))
    call()  # compiles every kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
        with torch.cuda.graph(graph, stream=stream):
            captured = call()
    torch.cuda.current_stream().wait_stream(stream)

    def replay() -> Factors:
        graph.replay()
        return [(u, s, vh) for u, s, vh, _ in captured]

    replay()
    flagged = sum(int((info != 0).sum().item()) for _, _, _, info in captured)
    if flagged:
        raise RuntimeError(f"{flagged} matrices flagged after a CUDA graph replay of the rSVD")
    return replay


# An H200 cost model of one fasttrunc rSVD call (ESTIMATES: no GPU has timed the kernels). The
# ceilings are those of benchmarks/BASELINES.md and fasttrunc.bench.lowrank's model; the rest are
# assumptions, named so that the first gpu_check.sh run can check each against its stage table.
RSVD_MODEL = {
    "hbm_gbps": 4220.0,  # device copy (BASELINES.md)
    "l2_gbps": 10000.0,  # assumed aggregate L2 bandwidth (as in the low-rank model)
    "l2_gbps_per_sm": 127.0,  # assumed: 64 B per clock per SM at 1.98 GHz
    "tf32_tflops": 247.0,  # assumed: 50% of the 494 TFLOP/s dense tf32 peak
    "fp16_tflops": 494.0,  # assumed: 50% of the 989 TFLOP/s dense fp16 peak
    "fp32_fma_tflops": 33.5,  # assumed: 50% of the 67 TFLOP/s fp32 FMA peak
    # torch's batched fp64 Cholesky, derived from a measurement: BASELINES.md 2b timed torch's
    # CholeskyQR2 of 24 x 8192 x 266 at 7.83 ms (two steps); less its two products per step at this
    # model's rates, about 2.6 ms a step is the Cholesky of 24 matrices: 0.11 ms a matrix at
    # l = 266 (its l = 74 figure, 2.07 ms, gives 0.037 ms; scaled linearly in l). Not used by the
    # pipeline any more (batched_cholesky); kept for the comparison.
    "torch_cholesky_ms_per_matrix": 0.11,
    "torch_cholesky_l": 266,
    "l2_round_trip_us": 0.3,  # assumed: one dependent L2 read (about 600 cycles with the loop around it)
    "fp64_tflops": 33.5,  # assumed: 50% of the 67 TFLOP/s fp64 tensor-core peak
    "launch_ms": 0.005,  # assumed: one eager launch of a small torch op or a Triton kernel
    # Jacobi on R^T at l = 266 (k = 256 + 10, 4096 x 1024, n_iter = 2), measured on the CPU: 6-9
    # sweeps for spectra 0.97^i, 1/i, i^-0.5 and a flat one (linspace 1..0.1); the flat one, the
    # slowest, took 9, and 62% of its pair-rounds rotated (53% for 1/i, 58% for i^-0.5).
    "jacobi_sweeps": 9,
    "jacobi_rotating": 0.62,
    # assumed: one round of the replay kernel (two L1 loads of the log, a shared-memory exchange
    # for the gather, the FMAs), a chain of dependent rounds per program
    "replay_round_us": 0.2,
    # CholeskyQR steps that do work of a call's 4 (the rest are skipped on the device): measured
    # on the CPU, 4096x1024, k = 256, spectra 1/i and i^-0.5: one in a loose call, two in a strict one.
    "loose_work_steps": 1,
    "strict_work_steps": 2,
    "sms": 132,
}


def _bmm_ms(
    batch: int,
    m: int,
    k: int,
    n: int,
    itemsize: int,
    precision: str,
    model: Mapping[str, float] = RSVD_MODEL,
) -> float:
    """One batched_matmul launch ``(batch, m, k) @ (batch, k, n)`` at its tiles (``bmm_tiles``): the
    larger of its memory time (HBM once, L2 re-reads per tile: ``m k n_pad (1/BN + 1/BM)`` operand
    loads) and its MMA time. ``precision`` is the kernel's: ``"tf32x3"`` / ``"tf32x2"`` are three /
    two tf32 MMAs, ``"fp16"`` one fp16 MMA (``itemsize`` 2), ``"ieee"`` FMA."""
    from fasttrunc.kernels import svd as svd_kernels

    block_m, block_n, _ = svd_kernels.bmm_tiles(n, precision, itemsize)
    n_pad = -(-n // block_n) * block_n
    m_pad = -(-m // block_m) * block_m
    hbm = batch * (itemsize * m * k + 4 * (k * n + m * n))
    l2 = batch * m_pad * k * n_pad * (itemsize / block_n + 4 / block_m)
    memory = hbm / (model["hbm_gbps"] * 1e6) + l2 / (model["l2_gbps"] * 1e6)
    flops = 2 * batch * m_pad * k * n_pad
    if precision == "ieee":
        compute = flops / (model["fp32_fma_tflops"] * 1e9)
    elif precision == "fp16":
        compute = flops / (model["fp16_tflops"] * 1e9)
    else:
        compute = {"tf32x3": 3, "tf32x2": 2}.get(precision, 1) * flops / (model["tf32_tflops"] * 1e9)
    return max(memory, compute) + model["launch_ms"]


def cholesky_kernel_ms(count: int, l: int, model: Mapping[str, float] = RSVD_MODEL) -> float:
    """Estimated time of one ``batched_cholesky`` launch: one program per matrix, each row a chain
    of dependent L2 reads (its row tiles' sums over the rows above, the pivot in the first), or the
    L2 bandwidth of the programs (l^3 / 6 fp64 values read a matrix), whichever is longer."""
    from fasttrunc.kernels import svd as svd_kernels

    block_i, block_k = svd_kernels._CHOLESKY_BLOCK_I, svd_kernels._CHOLESKY_BLOCK_K
    chain = sum(max(1, -(-j // block_k)) * -(-(l - j) // block_i) for j in range(l))
    latency = chain * model["l2_round_trip_us"] / 1e3
    bandwidth = min(model["l2_gbps"], min(count, model["sms"]) * model["l2_gbps_per_sm"])
    waves = -(-count // int(model["sms"]))
    return waves * max(latency, count * 8 * l**3 / 6 / (bandwidth * 1e6)) + model["launch_ms"]


def jacobi_ms(count: int, l: int, model: Mapping[str, float] = RSVD_MODEL) -> float:
    """Estimated time of ``jacobi_svd`` on ``count`` l x l matrices, launch by launch: the X
    programs (one per matrix, L2-bound at the per-SM bandwidth of the programs: each round reads X
    for its sums and reads and writes the columns of the pairs that rotate) beside the replay of
    the previous launch's rotations on V (rows of V in registers, a chain of rounds per program, in
    waves of one CTA per SM on the SMs the X programs leave free); a launch lasts the longer of
    the two, and a last launch replays on every SM. Past the replay's column bound the X programs
    rotate V's columns too, and there is no replay."""
    from fasttrunc.kernels import svd as svd_kernels

    npair = (l + 1) // 2
    stride = -(-2 * npair // 32) * 32
    unit = 2 * npair * stride * 4  # X, read once
    rounds = 2 * npair - 1  # a sweep
    bandwidth = min(model["l2_gbps"], count * model["l2_gbps_per_sm"])
    block_c = svd_kernels._next_pow2(2 * npair)
    replayed = block_c <= svd_kernels._REPLAY_MAX_COLUMNS  # else the X programs rotate V too
    moved = (2 if replayed else 4) * model["jacobi_rotating"]
    x_sweep = count * rounds * unit * (1 + moved) / (bandwidth * 1e6)
    programs = count * -(-stride // svd_kernels.replay_block_r(block_c)) if replayed else 0
    sms = int(model["sms"])
    free = max(1, sms - min(count, sms))

    def replay(sweeps: int, on_sms: int) -> float:
        return -(-programs // on_sms) * sweeps * rounds * model["replay_round_us"] / 1e3

    per_launch = svd_kernels._JACOBI_SWEEPS_PER_LAUNCH
    total, left, previous = 0.0, int(model["jacobi_sweeps"]), 0
    for _ in range(-(-svd_kernels._JACOBI_MAX_SWEEPS // per_launch)):
        here = min(per_launch, left)
        total += max(here * x_sweep, replay(previous, free)) + model["launch_ms"]
        left, previous = left - here, here
    return total + (replay(previous, sms) + model["launch_ms"] if replayed else 0.0)


def inverse_kernel_ms(count: int, l: int, model: Mapping[str, float] = RSVD_MODEL) -> float:
    """Estimated time of one ``upper_inverse_kernel`` launch: a program per block of columns, the
    last block's chain of dependent L2 reads the longest (a row's sums over the rows below it)."""
    from fasttrunc.kernels import svd as svd_kernels

    block_j, block_k = svd_kernels._INVERSE_BLOCK_J, svd_kernels._INVERSE_BLOCK_K
    chain = sum(max(1, -(-(l - i - 1) // block_k)) for i in range(l))
    programs = count * -(-l // block_j)
    waves = -(-programs // (2 * int(model["sms"])))  # 2 CTAs per SM, loose (benchmarks/AOT_AUDIT.md)
    return waves * chain * model["l2_round_trip_us"] / 1e3 + model["launch_ms"]


def _cholqr_calls(m: int, n: int, n_iter: int) -> list[tuple[int, bool, bool]]:
    """``(rows, strict, need_r)`` of each CholeskyQR call of the range finder, in order: the
    sketch's, ``W^T Q`` and ``W Z`` per iteration (the last W Z strict: U's basis), then ``W^T Q``
    for ``Q2 R`` (strict, R accumulated)."""
    calls = [(m, n_iter == 0, False)]
    for i in range(n_iter):
        calls += [(n, False, False), (m, i == n_iter - 1, False)]
    return calls + [(n, True, True)]


def cholqr_products_ms(
    count: int, rows: int, l: int, strict: bool, need_r: bool, model: Mapping[str, float] = RSVD_MODEL
) -> float:
    """The big work of one CholeskyQR call on ``count`` matrices ``rows x l``: per working step the
    Gram's upper tiles and the in-place update (its upper triangle: ``T (T + 1) / 2`` of ``T^2``
    tiles), both in 3xTF32; steps where every matrix has settled cost a launch each; R's fp64
    product where ``need_r``; after the steps, the finite check and the stand-in (3 passes over Q)."""
    from fasttrunc.kernels import svd as svd_kernels

    def ms(flops: float, hbm: float, l2: float) -> float:
        memory = hbm / (model["hbm_gbps"] * 1e6) + l2 / (model["l2_gbps"] * 1e6)
        return max(memory, 3 * flops / (model["tf32_tflops"] * 1e9)) + model["launch_ms"]

    bn = svd_kernels._GRAM_BLOCK_N
    t = -(-l // bn)
    gram = ms(2 * count * rows * bn * bn * t * (t + 1) / 2, 4 * count * rows * l, count * t * (t + 1) * rows * bn * 4)
    bm, bn = svd_kernels._TRMM_BLOCK_M, svd_kernels._TRMM_BLOCK_N
    t = -(-l // bn)
    blocks = count * -(-rows // bm)
    triangle = t * (t + 1) / 2
    update = ms(2 * blocks * bm * bn * bn * triangle, 8 * count * rows * l, blocks * triangle * (bn + bm) * bn * 4)
    work = model["strict_work_steps" if strict else "loose_work_steps"]
    steps = svd_kernels._CHOLQR_STEPS
    total = work * (gram + update) + (steps - work) * 2 * model["launch_ms"]
    if need_r:
        total += steps * (2 * count * l**3 / (model["fp64_tflops"] * 1e9) + 2 * model["launch_ms"])
    return total + 3 * 4 * count * rows * l / (model["hbm_gbps"] * 1e6) + 2 * model["launch_ms"]


def torch_cholesky_ms(count: int, l: int, model: Mapping[str, float] = RSVD_MODEL) -> float:
    """torch's batched fp64 Cholesky of ``count`` l x l matrices, scaled from BASELINES.md 2b."""
    return model["torch_cholesky_ms_per_matrix"] * count * l / model["torch_cholesky_l"]


def estimate_rsvd_ms(
    shapes: Sequence[tuple[int, int, int]],
    k: int,
    n_iter: int,
    oversample: int,
    itemsize: int = 4,
    model: Mapping[str, float] = RSVD_MODEL,
) -> dict[str, float]:
    """Estimated milliseconds per stage of one ``randomized_svd_triton_many`` call on an H200.

    ``shapes`` are ``(count, m, n)`` batches (one ``l``: their factorizations share launches); the
    stages are the passes over W, the CholeskyQR steps (the Gram's upper tiles and the in-place
    update in 3xTF32, fp64 Cholesky and inverse in Triton; a matrix that has settled costs them
    nothing, a step where all have settled a launch each), the small Jacobi SVD
    (one program per matrix, L2-bound: each round reads and writes the padded ``l x l`` X and V),
    and the final ``U = Q U_T``, ``V = Q2 V_T``. Host syncs: none counted (one at the end).
    ``model`` holds the ceilings and assumptions (default :data:`RSVD_MODEL`). ``itemsize=2``
    models fp16 weights (fp16 range passes, 2xTF32 fp32-grade ones); 4, fp32 weights.
    """
    from fasttrunc.kernels import svd as svd_kernels

    l = k + oversample
    total_count = sum(c for c, _, _ in shapes)
    # The passes' kernel precisions on an H200: fp16 weights (itemsize 2, as Pythia's checkpoints
    # store them) steer the range in fp16 MMAs and take 2xTF32 for the fp32-grade passes.
    half = itemsize == 2
    steer = svd_kernels._pass_precision(svd_kernels.RANGE_PRECISION, torch.float16 if half else torch.float32)
    exact = "tf32x2" if half else "tf32x3"
    stages = dict.fromkeys(("passes", "cholesky_qr", "jacobi", "factors"), 0.0)
    for count, m0, n0 in shapes:
        m, n = max(m0, n0), min(m0, n0)
        precisions = [steer if n_iter else exact]  # the sketch
        for i in range(n_iter):
            precisions += [steer, exact if i == n_iter - 1 else steer]
        precisions.append(exact)  # the projection W^T Q
        # Sides alternate: W @ (n x l) then W^T @ (m x l).
        for j, precision in enumerate(precisions):
            rows, depth = (m, n) if j % 2 == 0 else (n, m)
            stages["passes"] += _bmm_ms(count, rows, depth, l, itemsize, precision, model=model)
        # CholeskyQR calls, 4 fixed steps each: loose between iterations, strict for U's basis (the
        # last W Z) and for Q2 (whose R is accumulated).
        for rows, is_strict, need_r in _cholqr_calls(m, n, n_iter):
            stages["cholesky_qr"] += cholqr_products_ms(count, rows, l, is_strict, need_r, model)
        stages["factors"] += _bmm_ms(count, m, l, k, 4, "tf32x3", model=model) + _bmm_ms(
            count, n, l, k, 4, "tf32x3", model=model
        )
    # The factorization and inverse of every step, once for all batches (one l: lock step): their
    # latency-bound chains where some matrix works, a launch each where all have settled.
    for _, is_strict, _ in _cholqr_calls(1, 1, n_iter):
        work = model["strict_work_steps" if is_strict else "loose_work_steps"]
        small = cholesky_kernel_ms(total_count, l, model) + inverse_kernel_ms(total_count, l, model)
        stages["cholesky_qr"] += work * small + (svd_kernels._CHOLQR_STEPS - work) * 2 * model["launch_ms"]
    stages["jacobi"] = jacobi_ms(total_count, l, model)
    stages["total"] = sum(stages.values())
    return stages


def _svd_lowrank_looped(groups: Sequence[torch.Tensor], k: int, os_: int) -> Factors:
    """LASER's routine, oversampled: ``torch.svd_lowrank(q=k+os, niter=2)`` per matrix."""
    out = []
    for w in groups:
        factors = [torch.svd_lowrank(w[i], q=k + os_, niter=2) for i in range(w.shape[0])]
        u = torch.stack([f[0][:, :k] for f in factors])
        s = torch.stack([f[1][:k] for f in factors])
        vh = torch.stack([f[2][:, :k].mT for f in factors])
        out.append((u, s, vh))
    return out


def _plain_torch(groups: Sequence[torch.Tensor], k: int, os_: int, seed: int) -> Factors:
    from fasttrunc.kernels.svd import randomized_svd_reference

    return [
        randomized_svd_reference(
            w, k, n_iter=2, oversample=os_, generator=torch.Generator(device=w.device).manual_seed(seed)
        )
        for w in groups
    ]


def _full_svd(groups: Sequence[torch.Tensor]) -> list[Any]:
    return [torch.linalg.svd(w, full_matrices=False) for w in groups]


def _row(method: str, timed: tuple[float, Any], groups: Sequence[torch.Tensor], optimal: list[float]) -> dict[str, Any]:
    seconds, out = timed
    return {"method": method, "seconds": seconds, "error_ratio": _error_ratio(list(groups), out, optimal)}


def run(config: SvdBenchConfig, progress: Progress = None) -> SvdBenchResult:
    """Time and score every variant on every matrix set and rank of ``config``.

    Meant for CUDA; ``device="cpu"`` works only under ``TRITON_INTERPRET=1`` and with the tiny
    set, to test the benchmark itself.
    """
    from fasttrunc.kernels._backend import use_triton
    from fasttrunc.runs import resolve_device

    device = resolve_device(config.device)
    if not use_triton(torch.empty(0, device=device)):
        raise ValueError(
            f"device {config.device!r} cannot run the Triton kernels; the SVD benchmark needs a CUDA device"
        )
    gen = torch.Generator().manual_seed(config.seed)
    sets = MATRIX_SETS | QUICK_SETS | TINY_SETS
    per_rank = 5 + config.defaults_variant + config.bf16 + (device.type == "cuda")
    steps = len(config.sets) * (len(config.ranks) * per_rank + config.full_svd)
    done = 0
    rows: list[dict[str, Any]] = []
    stages: list[dict[str, Any]] = []

    def step(description: str) -> None:
        nonlocal done
        done += 1
        report(progress, "bench svd", done, steps, description)

    seed = config.seed
    for set_name in config.sets:
        made = [_spectrum_matrices(c, m, n, gen, device) for c, m, n in sets[set_name]]
        groups = [w for w, _ in made]
        spectra = [sigma for _, sigma in made]
        count = sum(c for c, _, _ in sets[set_name])
        full_seconds = None
        if config.full_svd:
            torch.linalg.svd(groups[0][0, :64, :64])  # load the solver once; the full run is too long to repeat
            full_seconds, _ = _timed(functools.partial(_full_svd, groups), 1, warmup=False)
            step(f"{set_name} linalg.svd")
        for k in config.ranks:
            optimal = [sig[k:].pow(2).sum().sqrt().item() for sig in spectra]
            set_rows: list[dict[str, Any]] = []

            os_ = config.oversample
            for label, options in _sketch_variants(k, os_, config.defaults_variant):
                set_rows.append(
                    _row(
                        label, _timed(functools.partial(_ours, groups, k, options, seed), config.reps), groups, optimal
                    )
                )
                step(f"{set_name} k={k} {label}")
            if device.type == "cuda":
                options = _sketch_variants(k, os_, False)[0][1]
                replay = _graph_replay(groups, k, options)
                timed = _timed(replay, config.reps)
                set_rows.append(
                    _row(f"fasttrunc n_iter=2 os={os_} (tf32 range), CUDA graph replay", timed, groups, optimal)
                )
                del replay
                step(f"{set_name} k={k} graph replay")
            timed = _timed(functools.partial(_svd_lowrank_looped, groups, k, os_), config.reps)
            baseline = timed[0]
            set_rows.append(_row(f"torch.svd_lowrank(q=k+{os_}, niter=2) looped", timed, groups, optimal))
            step(f"{set_name} k={k} svd_lowrank")
            timed = _timed(functools.partial(_plain_torch, groups, k, os_, seed), config.reps)
            set_rows.append(_row(f"plain-torch batched randomized n_iter=2 os={os_}", timed, groups, optimal))
            step(f"{set_name} k={k} plain torch")
            if config.bf16:
                stored = [w.to(torch.bfloat16) for w in groups]
                options = {"n_iter": 2, "oversample": os_}
                # Scored against the fp32 matrices' optimum: includes the bf16 rounding of the weights.
                timed = _timed(functools.partial(_ours, stored, k, options, seed), config.reps)
                set_rows.append(_row(f"fasttrunc bf16 weights n_iter=2 os={os_} (tf32 range)", timed, groups, optimal))
                del stored
                step(f"{set_name} k={k} bf16")
            for row in set_rows:
                row.update(
                    set=set_name,
                    matrices=count,
                    k=k,
                    speedup_vs_svd_lowrank=baseline / row["seconds"],
                    speedup_vs_linalg_svd=None if full_seconds is None else full_seconds / row["seconds"],
                )
            rows.extend(set_rows)
            stages.extend(_stage_times(groups[0], k, os_, config.reps))
            step(f"{set_name} k={k} stages")
        if full_seconds is not None:
            rows.append(
                {
                    "set": set_name,
                    "matrices": count,
                    "k": None,
                    "method": "torch.linalg.svd, every matrix",
                    "seconds": full_seconds,
                    "error_ratio": 1.0,
                    "speedup_vs_svd_lowrank": None,
                    "speedup_vs_linalg_svd": 1.0,
                }
            )
        del groups, made
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return SvdBenchResult(config=config, device=name, rows=rows, stages=stages)
