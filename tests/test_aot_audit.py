"""Ahead-of-time audit for sm_90 of every config the planners pick (benchmarks/aot_audit.py), no GPU.

The interpreter runs the kernels as Python and cannot show what only the compiler decides:
spills, shared memory, whether a tensor-core path reaches an MMA instruction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_LIMIT = 227 * 1024


@pytest.mark.aot
@pytest.mark.slow
def test_every_planned_config_compiles_for_hopper_without_spills(tmp_path):
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh cache: every config really compiles
    out = tmp_path / "audit.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aot_audit.py"), "--json", str(out), "--jobs", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    results = data["results"]
    # The whole 36-cell grid: every cell is served by audited kernels or by torch.
    cells = {cell for r in results if r["kernel"].startswith("lowrank") for cell in r["cells"]}
    cells |= {c["cell"] for c in data["torch_cells"]}
    assert len(cells) == 36
    assert {r["kernel"] for r in results} >= {"lowrank_shrink_kernel", "lowrank_expand_kernel", "lowrank_tiled_kernel"}
    assert {r["config"].split()[0] for r in results if r["kernel"] == "jacobi_kernel"} == {"l=266", "l=512", "l=544"}
    for r in results:
        name = f"{r['kernel']} {r['config']}"
        assert r["registers"] is not None and r["registers"] <= 255, name
        assert r["spill_bytes"] == 0, name
        assert r["shared_bytes"] <= SHARED_LIMIT, name
        mma = r["sass"]["HGMMA"] + r["sass"]["HMMA"]
        if r["tensor_cores"]:
            assert mma > 0 and (r["wgmma_in_ptx"] or r["mma_sync_in_ptx"]), f"{name}: no tensor-core MMA"
        else:
            assert mma == 0 and r["sass"]["FFMA"] > 0, f"{name}: expected FFMA only"
    # Hopper's wgmma where the tile allows it (M tiles of 64 rows): the M = 256 / 4096 cells at r <= 128.
    wide = [r for r in results if r["kernel"].startswith("lowrank") and " bm=64 " in f" {r['config']} "]
    assert wide and all(r["wgmma_in_ptx"] for r in wide)
    # tf32 products of the rSVD reach wgmma; the Jacobi kernel loads 128 bits at every l (rows padded to 32).
    assert all(r["wgmma_in_ptx"] for r in results if r["kernel"] == "bmm_kernel" and not r["config"].startswith("ieee"))
    assert all(r["ldg128"] > 0 for r in results if r["kernel"] == "jacobi_kernel")
    # Occupancy, as the launcher sizes grids from it: every config fits at least one CTA per SM, and
    # the R_PAD = 512 shrink configs fit one or two, not always the two the planner first assumes.
    assert all(r["ctas_per_sm"] >= 1 for r in results)
    wide_rank = [
        r["ctas_per_sm"] for r in results if r["kernel"] == "lowrank_shrink_kernel" and " R=512 " in f" {r['config']} "
    ]
    assert wide_rank and set(wide_rank) <= {1, 2} and 1 in wide_rank, wide_rank
    # Programmatic dependent launch on sm_90: the shrink signals its dependents, the expand waits.
    for r in results:
        gdc = r["griddepcontrol_in_ptx"]
        if r["kernel"] == "lowrank_shrink_kernel":
            assert gdc == ["launch_dependents"], (r["config"], gdc)
        elif r["kernel"] == "lowrank_expand_kernel":
            assert gdc == ["wait"], (r["config"], gdc)
        else:
            assert gdc == [], (r["kernel"], gdc)
