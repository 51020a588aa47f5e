"""Ahead-of-time audit for sm_90 (H100 / H200) of every kernel config the planners pick, without a GPU.

    python benchmarks/aot_audit.py [--json PATH] [--markdown PATH] [--jobs N] [--subset]

Configs: the low-rank planner's choices for the 36-cell bf16 grid of benchmarks/BASELINES.md
(Pythia MLP shapes x r in {32, 128, 512} x M in {1, 16, 256, 4096}, 132 SMs), by the cost model
(default tunables) and by the rules (``cost_model=None``), deduplicated; the rSVD's batched product for each kernel precision and weight dtype, at the tiles
the launcher picks; the Jacobi kernel for l = 266 (k = 256 + 10), 512 and 544. For each:
registers, spills, shared memory,
whether the PTX holds wgmma (Hopper's tensor-core MMA) or mma.sync, 128-bit global loads and the
SASS mix. Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

SMS_H200 = 132
SHARED_LIMIT = 227 * 1024  # sm_90 opt-in shared memory per block (228 KB per SM, 1 KB reserved)
JACOBI_LS = (266, 512, 544)


def lowrank_jobs(subset: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(compile jobs, cells served by torch) for the 36-cell grid."""
    import torch

    from fasttrunc.bench.lowrank import DEFAULT_MS, DEFAULT_RANKS, PYTHIA_SHAPES
    from fasttrunc.kernels.lowrank_plan import DEFAULT_TUNABLES, plan_lowrank

    jobs: dict[tuple[Any, ...], dict[str, Any]] = {}
    torch_cells = []
    shapes = list(PYTHIA_SHAPES.values())[:1] if subset else list(PYTHIA_SHAPES.values())
    for k, n in shapes:
        for r in DEFAULT_RANKS:
            for m in DEFAULT_MS:
                cell = f"{k}->{n} r={r} M={m}"
                # The cost planner's choice (the default on CUDA) and the rules' (cost_model=None):
                # every Triton config either can launch on this grid.
                chosen = plan_lowrank(m, k, n, r, torch.bfloat16, SMS_H200, DEFAULT_TUNABLES)
                ruled = plan_lowrank(m, k, n, r, torch.bfloat16, SMS_H200, DEFAULT_TUNABLES.rules_only())
                if not chosen.triton:
                    torch_cells.append({"cell": cell, "scheme": chosen.scheme})
                ints = {"m": m, "k": k, "n": n, "r": r, "sx": k, "sa": k, "sb": r}
                for plan in dict.fromkeys(p for p in (chosen, ruled) if p.triton):
                    for index in range(len(plan.grids)):
                        key = (plan.scheme, index, plan.block_m, plan.block_k, plan.block_n, plan.r_pad)
                        key += (plan.split_block, plan.ws_rows, plan.num_warps, plan.num_stages)
                        key += (k % 16 == 0, n % 16 == 0)
                        job = jobs.setdefault(key, {"family": "lowrank", "plan": plan, "ints": ints, "cells": []})
                        job["index"] = index
                        job["cells"].append(cell)
    return list(jobs.values()), torch_cells


# The kernel precisions bmm_kernel runs per A dtype (kernels.svd.kernel_precision): 3xTF32 of a
# half-precision A is 2xTF32; fp16 MMAs serve the range passes over fp16 weights.
BMM_PRECISIONS = {"fp32": ("ieee", "tf32", "tf32x3"), "bf16": ("ieee", "tf32", "tf32x2"), "fp16": ("tf32x2", "fp16")}


def svd_jobs() -> list[dict[str, Any]]:
    # The passes at l = k + 10 = 266 and 74 (128-row tiles over 8 warps, 64 or 128 columns:
    # bmm_tiles) and U = Q U_T at k = 64 (64 x 64 over 4 warps), at the tiles the launcher picks.
    jobs: list[dict[str, Any]] = [
        {"family": "bmm", "precision": p, "a_type": t, "n": n}
        for n in (266, 74, 64)
        for t, precisions in BMM_PRECISIONS.items()
        for p in precisions
    ]
    # Strides compile as runtime values (no unit-stride specialization: the most registers any
    # strides take), so the transposed view W^T of W^T Q compiles as W does.
    jobs += [{"family": "jacobi", "l": l} for l in JACOBI_LS]
    jobs += [{"family": "cholesky", "l": l} for l in (266, 288)]
    # A CholeskyQR step: the Gram's upper tiles, the factorization, the inverse (strict and loose),
    # the in-place update; at l = 266 over m = 8192 rows.
    jobs += [{"family": "cholqr", "kernel": name, "l": 266} for name in ("gram", "step", "trmm")]
    jobs += [{"family": "cholqr", "kernel": "inverse", "l": 266, "loose": loose} for loose in (False, True)]
    return jobs


def _compile(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fasttrunc.kernels import aot

    if job["family"] == "lowrank":
        from fasttrunc.kernels._lowrank_launch import build_steps

        plan, ints = job["plan"], job["ints"]
        # pdl=True: what the launcher builds on sm_90 (the expand grid under programmatic dependent launch).
        step = build_steps(plan, torch.bfloat16, True, ints, pdl=True)[job["index"]]
        kernel = step.kernel
        names = [name for name in kernel.arg_names if name not in step.constexprs]
        pointers = [name for name in names if name.endswith("_ptr")]
        args: dict[str, Any] = dict.fromkeys(pointers)
        args |= dict(zip([name for name in names if not name.endswith("_ptr")], step.ints))
        types = {name: "*fp32" if name == "ws_ptr" else "*bf16" for name in pointers}
        compiled = aot.compile_kernel(kernel, args, step.constexprs, step.options, types)
        label = (
            f"{kernel.__name__.removeprefix('lowrank_')} bm={plan.block_m} bk={plan.block_k} bn={plan.block_n} "
            f"R={plan.r_pad} sb={plan.split_block}{f' rows={plan.ws_rows}' if plan.ws_rows == 1 else ''} "
            f"w={plan.num_warps} st={plan.num_stages}"
        )
        tensor_cores = True
        what = {"kernel": kernel.__name__, "config": label, "cells": job["cells"]}
    elif job["family"] == "bmm":
        from fasttrunc.kernels import svd
        from fasttrunc.kernels._svd_triton import bmm_kernel

        m, k, n = 8192, 2048, job["n"]
        args = {"a_ptr": None, "x_ptr": None, "c_ptr": None, "M": m, "N": n, "K": k}
        args |= {"s_ab": m * k, "s_am": k, "s_ak": 1, "s_xb": k * n, "s_xk": n, "s_xn": 1}
        args |= {"s_cb": m * n, "s_cm": n, "s_cn": 1}
        itemsize = 4 if job["a_type"] == "fp32" else 2
        block_m, block_n, warps = svd.bmm_tiles(n, job["precision"], itemsize)
        const = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": svd._BLOCK_K}
        const["PRECISION"] = job["precision"]
        types = {"a_ptr": "*" + job["a_type"], "x_ptr": "*fp32", "c_ptr": "*fp32"}
        compiled = aot.compile_kernel(bmm_kernel, args, const, {"num_warps": warps}, types)
        tensor_cores = job["precision"] != "ieee"
        what = {
            "kernel": "bmm_kernel",
            "config": f"{job['precision']}, A {job['a_type']}, bm={block_m} bn={block_n} w={warps}",
            "cells": [f"8192x2048 @ {n}"],
        }
    elif job["family"] == "cholesky":
        from fasttrunc.kernels import svd
        from fasttrunc.kernels._svd_triton import cholesky_kernel

        l = job["l"]
        args = {"g_ptr": None, "r_ptr": None, "info_ptr": None, "L": l, "STRIDE": l}
        types = {"g_ptr": "*fp64", "r_ptr": "*fp64", "info_ptr": "*i32"}
        const = {"BLOCK_I": svd._CHOLESKY_BLOCK_I, "BLOCK_K": svd._CHOLESKY_BLOCK_K}
        compiled = aot.compile_kernel(cholesky_kernel, args, const, {"num_warps": svd._CHOLESKY_WARPS}, types)
        tensor_cores = False
        what = {"kernel": "cholesky_kernel", "config": f"l={l} I={const['BLOCK_I']} K={const['BLOCK_K']}"}
        what["cells"] = [f"l = {l}"]
    elif job["family"] == "cholqr":
        what, compiled, tensor_cores = _compile_cholqr(job)
    else:
        from fasttrunc.kernels import svd
        from fasttrunc.kernels._svd_triton import jacobi_kernel

        l = job["l"]
        npair = (l + 1) // 2
        block_p = svd._next_pow2(npair)
        block_r = max(1, min(svd._JACOBI_TILE // block_p, svd._next_pow2(l)))
        stride = svd._cdiv(2 * npair, 32) * 32
        block_c = svd._next_pow2(2 * npair)
        pointers = ("x_ptr", "v_ptr", "info_ptr", "log_ptr", "count_ptr", "floor_ptr")
        args = dict.fromkeys(pointers) | {"batch": 48, "parity": 0, "run_x": 1, "L": 0, "NPAIR": npair}
        args["STRIDE"] = args["L"] = stride  # as jacobi_svd launches it
        args |= {"tol": 1e-5, "max_sweeps": 30}
        types = dict.fromkeys(pointers, "*fp32") | {"count_ptr": "*i32"}
        const = {"SWEEPS": svd._JACOBI_SWEEPS_PER_LAUNCH, "BLOCK_P": block_p, "BLOCK_R": block_r}
        const |= {"BLOCK_C": block_c, "REPLAY_R": svd.replay_block_r(block_c)}
        const["REPLAY"] = block_c <= svd._REPLAY_MAX_COLUMNS
        compiled = aot.compile_kernel(jacobi_kernel, args, const, {"num_warps": svd._JACOBI_WARPS}, types)
        config = f"l={l} P={block_p} R={block_r}, " + (
            f"replay C={block_c} R={const['REPLAY_R']}" if const["REPLAY"] else "V rotated in place, no replay"
        )
        what = {"kernel": "jacobi_kernel", "config": config, "cells": [f"l = {l}"]}
        tensor_cores = False
    report = aot.audit(compiled)
    from fasttrunc.kernels.lowrank_plan import ctas_per_sm

    num_warps = int(compiled.metadata.num_warps)
    occupancy = (
        None if report["registers"] is None else ctas_per_sm(report["registers"], report["shared_bytes"], num_warps)
    )
    return {**what, "tensor_cores": tensor_cores, "num_warps": num_warps, "ctas_per_sm": occupancy, **report}


def _compile_cholqr(job: dict[str, Any]) -> tuple[dict[str, Any], Any, bool]:
    """One of the four kernels of a CholeskyQR step (kernels/_cholqr_triton.py) as cholesky_qr launches it."""
    from fasttrunc.kernels import _cholqr_triton as kernels
    from fasttrunc.kernels import aot, svd

    l, m, name = job["l"], 8192, job["kernel"]
    if name in ("gram", "trmm"):
        precision = "tf32x3"  # dot_precision("fp32") on sm_90
        args: dict[str, Any] = {"q_ptr": None, "M": m, "L": l, "s_qb": m * l, "s_qm": l, "s_ql": 1}
        if name == "gram":
            kernel, const = kernels.gram_kernel, {"BLOCK_N": svd._GRAM_BLOCK_N, "BLOCK_K": svd._GRAM_BLOCK_K}
            args |= {"g_ptr": None, "state_ptr": None}
            types = {"q_ptr": "*fp32", "g_ptr": "*fp32", "state_ptr": "*i32"}
            warps, config = svd._GRAM_WARPS, f"Q^T Q upper tiles, {precision}, bn={const['BLOCK_N']}"
        else:
            kernel = kernels.trmm_inplace_kernel
            const = {"BLOCK_M": svd._TRMM_BLOCK_M, "BLOCK_N": svd._TRMM_BLOCK_N, "BLOCK_K": svd._TRMM_BLOCK_K}
            args |= {"rinv_ptr": None, "hold_ptr": None}
            types = {"q_ptr": "*fp32", "rinv_ptr": "*fp32", "hold_ptr": "*u8"}
            warps = svd._TRMM_WARPS
            config = f"Q <- Q R^-1 in place, {precision}, bm={const['BLOCK_M']} bn={const['BLOCK_N']}"
        const["PRECISION"] = precision
        cells = [f"{m} x {l}"]
    elif name == "step":
        kernel = kernels.cholqr_step_kernel
        const = {"BLOCK_I": svd._CHOLESKY_BLOCK_I, "BLOCK_K": svd._CHOLESKY_BLOCK_K}
        args = dict.fromkeys(("g_ptr", "state_ptr", "coef_ptr", "r_ptr", "hold_ptr", "aux_ptr"))
        args |= {"L": l, "done_tol": 0.1}
        types = {"g_ptr": "*fp32", "state_ptr": "*i32", "coef_ptr": "*fp64", "r_ptr": "*fp64"}
        types |= {"hold_ptr": "*u8", "aux_ptr": "*fp64"}
        warps, config = svd._CHOLESKY_WARPS, f"Cholesky + state, I={const['BLOCK_I']} K={const['BLOCK_K']}"
        cells = [f"l = {l}"]
    else:
        kernel = kernels.upper_inverse_kernel
        const = {"LOOSE": job["loose"], "BLOCK_J": svd._INVERSE_BLOCK_J, "BLOCK_K": svd._INVERSE_BLOCK_K}
        pointers = ("r_ptr", "x_ptr", "rinv_ptr", "hold_ptr", "state_ptr", "aux_ptr", "sums_ptr", "tickets_ptr")
        args = dict.fromkeys(pointers) | {"L": l, "kappa_max": 4096.0}
        types = {"r_ptr": "*fp64", "x_ptr": "*fp64", "rinv_ptr": "*fp32", "hold_ptr": "*u8", "state_ptr": "*i32"}
        types |= {"aux_ptr": "*fp64", "sums_ptr": "*fp32", "tickets_ptr": "*i32"}
        warps = svd._INVERSE_WARPS
        config = f"R^-1{', loose' if job['loose'] else ''}, J={const['BLOCK_J']} K={const['BLOCK_K']}"
        cells = [f"l = {l}"]
    compiled = aot.compile_kernel(kernel, args, const, {"num_warps": warps}, types)
    return {"kernel": kernel.__name__, "config": config, "cells": cells}, compiled, name in ("gram", "trmm")


def markdown(results: list[dict[str, Any]], torch_cells: list[dict[str, Any]], subset: bool, versions: str) -> str:
    lines = [
        "# Ahead-of-time audit, sm_90",
        "",
        "Written by `python benchmarks/aot_audit.py --markdown benchmarks/AOT_AUDIT.md` (no GPU: "
        f"`triton.compile` for `GPUTarget('cuda', 90, 32)`, `ptxas -v`, `cuobjdump -sass`); {versions}.",
        "`tests/test_aot_audit.py` (marked `aot`) runs the same audit and asserts: no spills, shared memory "
        f"<= {SHARED_LIMIT // 1024} KB, and a tensor-core MMA (wgmma or mma.sync) in every tensor-core config. "
        "`wgmma` says whether Hopper's warpgroup MMA was reached; `no` means the config runs `mma.sync` "
        "(Ampere-style) tensor-core code on the H200. `griddepcontrol`: the programmatic-dependent-launch "
        "instructions in the PTX (the split-K shrink signals its dependents, the expand waits for it). `CTAs/SM`: how many fit on one H200 SM at once "
        "(`lowrank_plan.ctas_per_sm`: registers in 256-per-warp units, shared memory with the 1 KB "
        "reservation, threads); the low-rank launcher sizes each grid from the same count, read from the "
        "compiled kernel after its first launch.",
        "",
    ]
    if subset:
        lines += ["Subset: only the first shape of the grid was compiled.", ""]
    lines += [
        "| kernel | config | cells | regs | spill B | smem KB | CTAs/SM | wgmma | mma.sync | griddepcontrol | LDG.128 "
        "| HGMMA | HMMA | FFMA | LDG | LDGSTS | STG |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = ", ".join(r["cells"][:3]) + (f" (+{len(r['cells']) - 3})" if len(r["cells"]) > 3 else "")
        s = r["sass"]
        lines.append(
            f"| {r['kernel']} | {r['config']} | {cells} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes'] / 1024:.1f} | {r['ctas_per_sm']} | {'yes' if r['wgmma_in_ptx'] else 'no'} | "
            f"{'yes' if r['mma_sync_in_ptx'] else 'no'} | {', '.join(r['griddepcontrol_in_ptx']) or '-'} | {r['ldg128']} | {s['HGMMA']} | {s['HMMA']} | "
            f"{s['FFMA']} | {s['LDG']} | {s['LDGSTS']} | {s['STG']} |"
        )
    if torch_cells:
        lines += [
            "",
            "Cells the cost planner serves with torch's two GEMMs (the rules' Triton configs for them,"
            " which `cost_model=None` launches, are audited above):",
            "",
        ]
        lines += [f"- {c['cell']}: {c['scheme']}" for c in torch_cells]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--subset", action="store_true", help="Only the first shape of the low-rank grid.")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_audit.py compiles kernels: run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    import torch
    import triton

    lowrank, torch_cells = lowrank_jobs(args.subset)
    jobs = lowrank + svd_jobs()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, jobs))
    versions = f"triton {triton.__version__}, torch {torch.__version__}"
    data = {"versions": versions, "subset": args.subset, "results": results, "torch_cells": torch_cells}
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    text = markdown(results, torch_cells, args.subset, versions)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
