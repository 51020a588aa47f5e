"""Accuracy of truncated_svd(method="randomized") on prescribed spectra, on the CPU (torch path).

    python benchmarks/svd_accuracy.py            # the table in README "Kernel: batched randomized SVD"

For each spectrum and size: the rank-k error as a multiple of the optimal sqrt(sum_{i>k} sigma_i^2),
the worst relative error of the top-k singular values, the worst |U^T U - I| / |Vh Vh^T - I|
entry, and the wall time of one call on this CPU (fp32, torch path). Rows: fasttrunc's defaults,
fasttrunc with torch's settings (n_iter=2, oversample=10), and torch.svd_lowrank with those.
"""

import os
import time

os.environ.setdefault("FASTTRUNC_BACKEND", "torch")  # the CPU path, not the Triton interpreter

import torch  # noqa: E402

from fasttrunc import truncated_svd  # noqa: E402
from fasttrunc.svd import DEFAULT_N_ITER, default_oversample  # noqa: E402

CASES = [(2048, 512, 64), (4096, 1024, 256)]
SPECTRA = {"1/i": lambda i: 1.0 / i, "0.97^i": lambda i: 0.97**i, "i^-0.5": lambda i: i**-0.5}


def matrix(m, n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return (u * sigma) @ v.T


def score(w64, sigma, k, u, s, vh, seconds):
    eye = torch.eye(k, dtype=torch.float64)
    err = torch.linalg.matrix_norm(w64 - (u.double() * s.double()) @ vh.double()).item()
    return (
        err / sigma[k:].pow(2).sum().sqrt().item(),
        ((s.double() - sigma[:k]).abs() / sigma[:k]).max().item(),
        max(
            (u.double().T @ u.double() - eye).abs().max().item(), (vh.double() @ vh.double().T - eye).abs().max().item()
        ),
        seconds,
    )


def main():
    print("| size | k | spectrum | method | error / optimal | top-k sigma rel. error | orthonormality | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for m, n, k in CASES:
        i = torch.arange(1, n + 1, dtype=torch.float64)
        for name, fn in SPECTRA.items():
            sigma = fn(i)
            w64 = matrix(m, n, sigma)
            w = w64.float()
            runs = {
                f"fasttrunc defaults (n_iter={DEFAULT_N_ITER}, oversample={default_oversample(k)})": {},
                "fasttrunc n_iter=2, oversample=10": {"n_iter": 2, "oversample": 10},
            }
            rows = []
            for label, options in runs.items():
                start = time.perf_counter()
                u, s, vh = truncated_svd(
                    w, k, method="randomized", generator=torch.Generator().manual_seed(0), **options
                )
                rows.append((label, score(w64, sigma, k, u, s, vh, time.perf_counter() - start)))
            torch.manual_seed(0)
            start = time.perf_counter()
            ul, sl, vl = torch.svd_lowrank(w, q=k + 10, niter=2)
            seconds = time.perf_counter() - start
            rows.append(
                ("torch.svd_lowrank(q=k+10, niter=2)", score(w64, sigma, k, ul[:, :k], sl[:k], vl[:, :k].T, seconds))
            )
            for label, (ratio, sig, orth, sec) in rows:
                print(
                    f"| {m}x{n} | {k} | {name} | {label} | {ratio:.4f} | {sig:.4f} | {orth:.1e} | {sec:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
