"""The cost-model estimate of one batched rSVD call on the 48 MLP matrices of Pythia-1.4b (no GPU).

    python benchmarks/estimate_svd.py

ESTIMATES, not measurements: fasttrunc.bench.svd.estimate_rsvd_ms (H200 ceilings of
benchmarks/BASELINES.md plus the named assumptions of RSVD_MODEL) per stage, at torch's settings
and at fasttrunc's defaults, for fp32 weights and for fp16 ones (as Pythia's checkpoints store them),
against the baselines BASELINES.md section 2 measured on an H200.
"""

from __future__ import annotations

from fasttrunc.bench.svd import MATRIX_SETS, cholesky_kernel_ms, estimate_rsvd_ms, torch_cholesky_ms
from fasttrunc.svd import DEFAULT_N_ITER, default_oversample

# BASELINES.md section 2, seconds for the 24 matrices of one 1.4b shape (both shapes: twice).
SVD_LOWRANK_LOOPED_S = {64: 2 * 0.139, 256: 2 * 0.536}
LINALG_SVD_S = 2 * 5.57


def main() -> int:
    shapes = MATRIX_SETS["pythia-1.4b-mlp"]
    print("ESTIMATES (cost model, no GPU timing), every row; the baselines are measured, on fp32 matrices.\n")
    print(
        "| k | weights | settings | passes | CholeskyQR | Jacobi | factors | total ms "
        "| vs svd_lowrank looped | vs linalg.svd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in (64, 256):
        # fp16 rows: Pythia's checkpoints store fp16 (fp16 range passes, 2xTF32 for the last two).
        for weights, itemsize in (("fp32", 4), ("fp16", 2)):
            for label, n_iter, oversample in (
                ("n_iter=2, oversample=10 (torch's)", 2, 10),
                (
                    f"defaults (n_iter={DEFAULT_N_ITER}, oversample={default_oversample(k)})",
                    DEFAULT_N_ITER,
                    default_oversample(k),
                ),
            ):
                est = estimate_rsvd_ms(shapes, k, n_iter, oversample, itemsize=itemsize)
                stages = " | ".join(f"{est[name]:.1f}" for name in ("passes", "cholesky_qr", "jacobi", "factors"))
                ratio = 1e3 * SVD_LOWRANK_LOOPED_S[k] / est["total"]
                print(
                    f"| {k} | {weights} | {label} | {stages} | {est['total']:.1f} | {ratio:.1f}x "
                    f"| {1e3 * LINALG_SVD_S / est['total']:.0f}x |"
                )
    count = sum(c for c, _, _ in shapes)
    for l in (74, 266):
        print(
            f"\nfp64 Cholesky of {count} x {l} x {l}, one launch: batched_cholesky {cholesky_kernel_ms(count, l):.2f} ms "
            f"(est.), torch {torch_cholesky_ms(count, l):.2f} ms (scaled from BASELINES.md 2b)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
