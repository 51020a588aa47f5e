"""The low-rank benchmark harness (fasttrunc.bench.lowrank) and `fasttrunc bench lowrank`, on the CPU.

The harness runs a tiny grid in Triton's interpreter (conftest sets TRITON_INTERPRET=1); GPU
timings come from benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import os

import pytest
import torch

from fasttrunc.bench import lowrank as bench
from fasttrunc.kernels.lowrank_plan import LowrankTunables
from fasttrunc.kernels.tolerances import LOWRANK_RTOL

NATIVE = os.environ.get("FASTTRUNC_TEST_NATIVE", "0") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if NATIVE else "cpu"


@pytest.mark.skipif(not NATIVE and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the interpreter")
def test_bench_harness_runs_a_tiny_grid():
    """The benchmark's own code (checks, timing loops, table, summary) on a tiny grid."""
    config = bench.LowrankBenchConfig(
        shapes=((33, 20),),
        ranks=(5,),
        ms=(1, 3),
        dtype="float32",
        reps=1,
        calls=2,
        graph_ms=5,
        device=DEVICE,
        tunables=LowrankTunables(min_k_chunk=16),
    )
    result = bench.run(config)
    assert [row["m"] for row in result.rows] == [1, 3]
    assert all(row["correct"] and row["rel_err"] < LOWRANK_RTOL[torch.float32] for row in result.rows)
    assert all(row["fused_eager_us"] > 0 and row["two_gemms_eager_us"] > 0 for row in result.rows)
    assert all(row["scheme"] == "splitk" and len(row["grid"]) == 2 for row in result.rows)
    # The cost model's estimate of every scheme rides along, for calibrate_lowrank.py.
    assert all(set(row["estimate_us"]) == {"splitk", "tiled", "torch"} for row in result.rows)
    assert all(v > 0 for row in result.rows for v in row["estimate_us"].values())
    assert result.sms == (torch.cuda.get_device_properties(0).multi_processor_count if NATIVE else 4)
    columns, rows = bench.table_rows(result)
    assert len(rows) == 2 and all(len(r) == len(columns) for r in rows)
    assert result.summary["cells"] == 2 and result.summary["incorrect_cells"] == 0
    assert len(bench.summary_lines(result)) == 5
    assert result.to_dict()["environment"]["torch"] == torch.__version__


def test_weight_rotation_exceeds_the_l2_for_decode_cells():
    """Decode cells cycle through enough weight sets to leave a 60 MB L2, within the cap."""
    itemsize = 2
    copies = bench._copies(2048, 8192, 32, itemsize, 8)
    assert copies == 2  # 34 MB per set (factors + dense weight): two sets pass 64 MB
    assert bench._copies(33, 20, 5, 4, 8) == 8  # tiny: capped
    assert bench._copies(5120, 20480, 512, itemsize, 8) == 1  # 235 MB: one set is enough


@pytest.mark.parametrize(
    "text,pattern",
    [("2048x8192,80", r"shape '80' is not IN x OUT"), ("2048*8192", r"shape '2048\*8192'")],
)
def test_bench_shape_parsing(text, pattern):
    assert bench.parse_shapes(" 2048x8192, 8192X2048") == ((2048, 8192), (8192, 2048))
    with pytest.raises(ValueError, match=pattern):
        bench.parse_shapes(text)


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"ranks": (0,)}, r"rank 0 is out of range; allowed: an integer in \[1, 1024\]"),
        ({"ranks": (40,), "shapes": ((33, 20),)}, r"rank 40 is out of range for the shape 33x20; allowed: 1\.\.20"),
        ({"ms": (70000,)}, r"M \(rows\) 70000 is out of range; allowed: an integer in \[1, 65536\]"),
        ({"dtype": "int8"}, r"dtype 'int8' is not known; allowed: float32, float16, bfloat16"),
        ({"reps": True}, r"reps True is not an integer"),
        ({"tunables": {"decode_max_m": 1}}, r"tunables .* is not a LowrankTunables"),
    ],
)
def test_bench_config_rejects_bad_values(change, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        bench.LowrankBenchConfig(**change)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize(
    "args,message",
    [
        ([], "needs a CUDA device, and this machine has none"),
        (["--shapes", "2048by8192"], "shape '2048by8192' is not IN x OUT"),
        (["--ranks", "a,b"], "ranks 'a,b' is not a comma-separated list of integers"),
    ],
)
def test_cli_bench_lowrank_errors_in_one_line(args, message):
    from typer.testing import CliRunner

    from fasttrunc.cli.main import app

    result = CliRunner().invoke(app, ["bench", "lowrank", *args])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert message in text and "Traceback" not in result.output


def test_cost_model_estimates_the_triton_plans_only():
    from fasttrunc.kernels.lowrank_plan import DEFAULT_TUNABLES, plan_lowrank

    rules = DEFAULT_TUNABLES.rules_only()  # Triton plans wherever the rules allow them

    def est(m, k, n, r):
        return bench.estimate_fused_us(plan_lowrank(m, k, n, r, torch.bfloat16, 132, rules), m, k, n, r, 2)

    assert est(4096, 2048, 8192, 512) is None  # torch's two GEMMs serve it
    decode, prefill = est(1, 2048, 8192, 128), est(4096, 2048, 8192, 128)
    assert 0 < decode < prefill
    assert est(4096, 2048, 8192, 32) < prefill  # fewer bytes and FLOPs at a lower rank
    # Never below the byte floor at the H200's measured copy bandwidth.
    floor = 1e6 * 2 * (4096 * 2048 + 2048 * 128 + 128 * 8192 + 4096 * 8192) / 4.22e12
    assert prefill > floor
