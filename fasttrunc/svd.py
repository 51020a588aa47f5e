"""Truncated SVD of one matrix, a batch ``(..., m, n)``, or a list of matrices: exact or randomized.

``method="randomized"`` runs the batched randomized range finder of :mod:`fasttrunc.kernels.svd`:
Triton kernels on CUDA (weights read in their stored dtype, every small factorization batched),
the torch reference on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch

from fasttrunc import checks
from fasttrunc.kernels.svd import randomized_svd, randomized_svd_many
from fasttrunc.ranks import Rank, resolve_rank
from fasttrunc.runs import compute_dtype

METHODS = ("exact", "randomized")

# Power iterations by default: 2 (torch's and LASER's choice) leaves the 64th singular value of a
# 1/i spectrum 3.5% low at 2048x512 with 10 oversamples; 6 brings it to 0.2% (measured, fp32).
DEFAULT_N_ITER = 6
# Oversampling columns by default: max(16, k // 8). The k-th singular value converges like
# (sigma_{l+1} / sigma_k)^(2 n_iter), and for slowly decaying spectra that gap closes as k grows
# (1/i: k / (l + 1)), so extra columns buy more than extra iterations (measured, fp32, 2048x512,
# 1/i, k = 64, worst of 6 draws: sigma_64 0.86% low with 10 columns and 6 iterations, 0.50% with 7
# iterations, 0.25% with 16 columns; 4096x1024, k = 256: 2.1% low with 10 columns, 0.6% with 26).
MIN_OVERSAMPLE = 16
OVERSAMPLE_FRACTION = 8


def default_oversample(k: int) -> int:
    """The oversampling used when none is given: ``max(16, k // 8)``."""
    return max(MIN_OVERSAMPLE, k // OVERSAMPLE_FRACTION)


def check_method(method: object) -> str:
    return checks.choice("method", method, METHODS)


Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_matrix(w: object, where: str = "w", finite: bool = False) -> torch.Tensor:
    """``w`` if it is a floating-point tensor ``(..., m, n)`` with values (and, with ``finite``, finite ones)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor of shape (..., m, n); got {type(w).__name__}")
    if w.dim() < 2:
        raise ValueError(f"{where} must be a tensor of shape (..., m, n); got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{where} has dtype {w.dtype}; a floating-point matrix is required")
    if w.device.type == "meta":
        raise ValueError(f"{where} is on the meta device and holds no values; load its weights first")
    if finite and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{where} contains NaN or infinite values; the SVD of a non-finite matrix is undefined")
    return w


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")


def _check_out_dtype(dtype: object) -> None:
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype; allowed: float32, float64, float16, bfloat16")


# Each power iteration is two passes over the matrix; a few give fp32 accuracy (DEFAULT_N_ITER), and a
# count beyond this bound is a mistake (a seed or a size passed in the wrong place), not a setting.
MAX_N_ITER = 100


def _check_options(n_iter: object, oversample: object) -> tuple[int | None, int | None]:
    """``n_iter`` in [0, MAX_N_ITER] and ``oversample`` >= 0 as plain ints, or None (the defaults)."""
    return (
        None if n_iter is None else checks.integer("n_iter", n_iter, 0, MAX_N_ITER),
        None if oversample is None else checks.non_negative("oversample", oversample),
    )


def group_matrices(ws: Sequence[torch.Tensor], ranks: Sequence[int]) -> dict[tuple, list[int]]:
    """Indices of ``ws`` grouped by (shape, dtype, device, rank): each group is one batched SVD."""
    groups: dict[tuple, list[int]] = {}
    for i, (w, k) in enumerate(zip(ws, ranks)):
        groups.setdefault((tuple(w.shape), w.dtype, w.device, k), []).append(i)
    return groups


@overload
def truncated_svd(
    w: torch.Tensor,
    rank: Rank,
    method: str = ...,
    n_iter: int | None = ...,
    oversample: int | None = ...,
    generator: torch.Generator | None = ...,
    dtype: torch.dtype | None = ...,
) -> Triplets: ...


@overload
def truncated_svd(
    w: Sequence[torch.Tensor],
    rank: Rank | Sequence[Rank],
    method: str = ...,
    n_iter: int | None = ...,
    oversample: int | None = ...,
    generator: torch.Generator | None = ...,
    dtype: torch.dtype | None = ...,
) -> list[Triplets]: ...


def truncated_svd(
    w: torch.Tensor | Sequence[torch.Tensor],
    rank: Rank | Sequence[Rank],
    method: str = "exact",
    n_iter: int | None = None,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Triplets | list[Triplets]:
    """Top-``rank`` singular triplets ``U (..., m, k)``, ``S (..., k)``, ``Vh (..., k, n)``.

    ``rank`` follows fasttrunc's rank rules (int = absolute, float = fraction of ``min(m, n)``).
    Computed in fp32 (fp64 for fp64 input) and returned in ``dtype`` (default ``w.dtype``); ``S``
    sorted descending.

    ``method="randomized"``: ``n_iter`` power iterations (default 6, at most 100) with ``oversample`` extra
    columns (default ``max(16, k // 8)``); on CUDA it runs the Triton kernels, reading fp32 /
    bf16 / fp16 weights as stored. It falls back to the exact SVD when ``k + oversample >=
    min(m, n)``, where sketching saves nothing and the exact answer costs no more. For an exactly
    rank-deficient matrix the singular vectors paired with zero singular values are unspecified
    (on CUDA the columns of ``U`` that belong to them are zero); ``U S Vh`` stays exact.

    ``w`` may also be a list of matrices of any shapes: each is factorized at its own rank (a
    float rank is a fraction of each one's ``min(m, n)``), matrices of one shape, dtype and device
    in one batched call, and a list of ``(U, S, Vh)`` comes back in the input order. With a list,
    ``rank`` may also be a list of ranks, one per matrix.
    """
    check_method(method)
    _check_generator(generator)
    _check_out_dtype(dtype)
    if isinstance(w, list | tuple):
        return _truncated_svd_list(w, rank, method, n_iter, oversample, generator, dtype)
    w = check_matrix(w)
    n_iter, oversample = _check_options(n_iter, oversample)
    n_iter = DEFAULT_N_ITER if n_iter is None else n_iter
    m, n = w.shape[-2:]
    k = resolve_rank(rank, m, n)
    oversample = default_oversample(k) if oversample is None else oversample
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or infinite values; the SVD of a non-finite matrix is undefined")
    batch = w.shape[:-2]
    out_dtype = w.dtype if dtype is None else dtype
    if k == 0:
        return (
            w.new_zeros(*batch, m, 0, dtype=out_dtype),
            w.new_zeros(*batch, 0, dtype=out_dtype),
            w.new_zeros(*batch, 0, n, dtype=out_dtype),
        )
    if method == "randomized" and k + oversample < min(m, n):
        # Handed over as stored: the Triton path reads bf16 / fp16 without an fp32 copy.
        u, s, vh = randomized_svd(w, k, n_iter=n_iter, oversample=oversample, generator=generator)
    else:
        u, s, vh = torch.linalg.svd(w.to(compute_dtype(w.dtype)), full_matrices=False)
        u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    return u.to(out_dtype), s.to(out_dtype), vh.to(out_dtype)


def _truncated_svd_list(
    ws: Sequence[torch.Tensor],
    rank: Rank | Sequence[Rank],
    method: str,
    n_iter: int | None,
    oversample: int | None,
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
) -> list[Triplets]:
    """The list form: every check first, then the matrices grouped by (shape, dtype, device, rank).

    Groups that take the randomized path go to one :func:`randomized_svd_many` call (on CUDA their
    small SVDs share launches); the others (exact, rank 0, rank near full) one call each.
    """
    n_iter, oversample = _check_options(n_iter, oversample)
    if isinstance(rank, list | tuple):
        if len(rank) != len(ws):
            raise ValueError(f"rank has {len(rank)} entries for {len(ws)} matrices; give one rank, or one per matrix")
        ranks_given: Sequence[Rank] = rank
    else:
        ranks_given = [rank] * len(ws)  # type: ignore[list-item]  # a single rank here
    ks: list[int] = []
    for i, w in enumerate(ws):
        check_matrix(w, f"w[{i}]")
        if w.dim() != 2:
            raise ValueError(f"w[{i}] has shape {tuple(w.shape)}; a list holds single (m, n) matrices")
        ks.append(resolve_rank(ranks_given[i], *w.shape))
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"w[{i}] contains NaN or infinite values; the SVD of a non-finite matrix is undefined")
    out: list[Triplets | None] = [None] * len(ws)
    sketched: list[tuple[list[int], torch.Tensor, int, int]] = []
    for (shape, _, _, k), members in group_matrices(ws, ks).items():
        stacked = torch.stack([ws[i] for i in members])
        m, n = shape
        os_ = default_oversample(k) if oversample is None else int(oversample)
        if method == "randomized" and k > 0 and k + os_ < min(m, n):
            sketched.append((members, stacked, k, os_))
            continue
        u, s, vh = truncated_svd(stacked, k, method, n_iter, oversample, generator, dtype)
        for j, i in enumerate(members):
            out[i] = (u[j], s[j], vh[j])
    if sketched:
        results = randomized_svd_many(
            [stacked for _, stacked, _, _ in sketched],
            [k for _, _, k, _ in sketched],
            n_iter=DEFAULT_N_ITER if n_iter is None else int(n_iter),
            oversamples=[os_ for _, _, _, os_ in sketched],
            generator=generator,
        )
        for (members, stacked, _, _), factors in zip(sketched, results):
            u, s, vh = (t.to(stacked.dtype if dtype is None else dtype) for t in factors)
            for j, i in enumerate(members):
                out[i] = (u[j], s[j], vh[j])
    return out  # type: ignore[return-value]
