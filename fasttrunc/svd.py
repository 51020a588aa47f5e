"""Truncated SVD of one matrix, a batch ``(..., m, n)``, or a list of matrices: exact or randomized.

``method="randomized"`` runs the batched randomized range finder of :mod:`fasttrunc.kernels.svd`:
Triton kernels on CUDA (weights read in their stored dtype, every small factorization batched),
the torch reference on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fasttrunc.kernels.svd import randomized_svd, randomized_svd_many
from fasttrunc.ranks import resolve_rank

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
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not a truncation method; allowed: {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_matrix(w: object, where: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        raise ValueError(f"{where} must be a tensor of shape (..., m, n); got {getattr(w, 'shape', type(w))}")
    if not w.is_floating_point():
        raise ValueError(f"{where} has dtype {w.dtype}; a floating-point matrix is required")
    return w


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} {value!r} must be an int >= 0")


def truncated_svd(
    w: torch.Tensor | Sequence[torch.Tensor],
    rank: int | float,
    method: str = "exact",
    n_iter: int | None = None,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
) -> Triplets | list[Triplets]:
    """Top-``rank`` singular triplets ``U (..., m, k)``, ``S (..., k)``, ``Vh (..., k, n)``.

    ``rank`` follows fasttrunc's rank rules (int = absolute, float = fraction of ``min(m, n)``).
    Computed in fp32 (fp64 for fp64 input) and cast back to ``w.dtype``; ``S`` sorted descending.

    ``method="randomized"``: ``n_iter`` power iterations (default 6) with ``oversample`` extra
    columns (default ``max(16, k // 8)``); on CUDA it runs the Triton kernels, reading fp32 /
    bf16 / fp16 weights as stored. It falls back to the exact SVD when ``k + oversample >=
    min(m, n)``, where sketching saves nothing and the exact answer costs no more. For an exactly
    rank-deficient matrix the singular vectors paired with zero singular values are unspecified
    (on CUDA the columns of ``U`` that belong to them are zero); ``U S Vh`` stays exact.

    ``w`` may also be a list of matrices of any shapes: each is factorized at its own rank (a
    float rank is a fraction of each one's ``min(m, n)``), matrices of one shape, dtype and device
    in one batched call, and a list of ``(U, S, Vh)`` comes back in the input order.
    """
    check_method(method)
    if isinstance(w, (list, tuple)):
        return _truncated_svd_list(w, rank, method, n_iter, oversample, generator)
    _check_matrix(w)
    if n_iter is not None:
        _check_count("n_iter", n_iter)
    if oversample is not None:
        _check_count("oversample", oversample)
    n_iter = DEFAULT_N_ITER if n_iter is None else n_iter
    m, n = w.shape[-2:]
    k = resolve_rank(rank, m, n)
    oversample = default_oversample(k) if oversample is None else oversample
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or infinite values; the SVD of a non-finite matrix is undefined")
    batch = w.shape[:-2]
    if k == 0:
        return (
            w.new_zeros(*batch, m, 0),
            w.new_zeros(*batch, 0),
            w.new_zeros(*batch, 0, n),
        )
    if method == "randomized" and k + oversample < min(m, n):
        # Handed over as stored: the Triton path reads bf16 / fp16 without an fp32 copy.
        u, s, vh = randomized_svd(w, k, n_iter=n_iter, oversample=oversample, generator=generator)
    else:
        u, s, vh = torch.linalg.svd(w.to(_compute_dtype(w.dtype)), full_matrices=False)
        u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    return u.to(w.dtype), s.to(w.dtype), vh.to(w.dtype)


def _truncated_svd_list(
    ws: Sequence[torch.Tensor],
    rank: int | float,
    method: str,
    n_iter: int | None,
    oversample: int | None,
    generator: torch.Generator | None,
) -> list[Triplets]:
    """The list form: every check first, then the matrices grouped by (shape, dtype, device).

    Groups that take the randomized path go to one :func:`randomized_svd_many` call (on CUDA their
    small SVDs share launches); the others (exact, rank 0, rank near full) one call each.
    """
    for name, value in (("n_iter", n_iter), ("oversample", oversample)):
        if value is not None:
            _check_count(name, value)
    for i, w in enumerate(ws):
        _check_matrix(w, f"w[{i}]")
        if w.dim() != 2:
            raise ValueError(f"w[{i}] has shape {tuple(w.shape)}; a list holds single (m, n) matrices")
        resolve_rank(rank, *w.shape)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"w[{i}] contains NaN or infinite values; the SVD of a non-finite matrix is undefined")
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(ws):
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
    out: list[Triplets | None] = [None] * len(ws)
    sketched: list[tuple[list[int], torch.Tensor, int, int]] = []
    for members in groups.values():
        stacked = torch.stack([ws[i] for i in members])
        m, n = stacked.shape[-2:]
        k = resolve_rank(rank, m, n)
        os_ = default_oversample(k) if oversample is None else oversample
        if method == "randomized" and k > 0 and k + os_ < min(m, n):
            sketched.append((members, stacked, k, os_))
            continue
        u, s, vh = truncated_svd(stacked, rank, method, n_iter, oversample, generator)
        for j, i in enumerate(members):
            out[i] = (u[j], s[j], vh[j])
    if sketched:
        results = randomized_svd_many(
            [stacked for _, stacked, _, _ in sketched],
            [k for _, _, k, _ in sketched],
            n_iter=DEFAULT_N_ITER if n_iter is None else n_iter,
            oversamples=[os_ for _, _, _, os_ in sketched],
            generator=generator,
        )
        for (members, stacked, _, _), factors in zip(sketched, results):
            u, s, vh = (t.to(stacked.dtype) for t in factors)
            for j, i in enumerate(members):
                out[i] = (u[j], s[j], vh[j])
    return out  # type: ignore[return-value]
