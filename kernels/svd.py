"""Batched randomized truncated SVD.

Layers of this file (DESIGN.md section 4):
1-2. Triton kernels and launchers -- not yet: the batched GPU path lands with its own issue;
3.   torch reference              -- :func:`randomized_svd_reference`, the oracle and CPU path.
No gradients are needed here.

The reference is the randomized range finder with power iterations (Halko, Martinsson, Tropp
2011, algorithms 4.4 and 5.1): sample ``Y = W G`` with a Gaussian ``G`` of ``l = k + oversample``
columns, orthonormalize, alternate ``W^T Q`` / ``W Z`` ``n_iter`` times re-orthonormalizing after
every half step (without it the columns collapse onto the top singular vector in finite
precision), then take the exact SVD of the small ``l x n`` matrix ``Q^T W``.
"""

from __future__ import annotations

import torch


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` (batched, reduced Householder QR)."""
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def gaussian_sketch(
    batch_shape: torch.Size, n: int, l: int, *, dtype: torch.dtype, device: torch.device,
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
