"""The low-rank planner's cost model (kernels/lowrank_cost.py), its routing, and its calibration."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fasttrunc.bench import lowrank as bench
from fasttrunc.kernels import _lowrank_launch
from fasttrunc.kernels import lowrank_cost as lc
from fasttrunc.kernels.lowrank_plan import DEFAULT_TUNABLES, LowrankTunables, plan_lowrank, scheme_estimates
from fasttrunc.runs import jsonable

ROOT = Path(__file__).resolve().parents[1]
GRID = [(k, n, r, m) for k, n in bench.PYTHIA_SHAPES.values() for r in bench.DEFAULT_RANKS for m in bench.DEFAULT_MS]
BF16 = torch.bfloat16

# benchmarks/BASELINES.md: torch's two GEMMs on the H200, (in, out, r, M) -> us (1b and 1's M = 4096 rows).
MEASURED_TWO_GEMMS = {**bench.H200_TWO_GEMMS_GRAPH_US, **bench.H200_TWO_GEMMS_LARGE_EAGER_US}


def test_two_gemm_constants_match_the_measured_baselines():
    """The default model's two-GEMM estimate is within 12% of every H200 time it was fitted to."""
    for (k, n, r, m), us in MEASURED_TWO_GEMMS.items():
        est = lc.two_gemms_us(m, k, n, r, BF16, lc.DEFAULT_COST_MODEL)
        assert abs(math.log(est / us)) < 0.12, ((k, n, r, m), est, us)


def test_planner_takes_the_scheme_with_the_lowest_estimate():
    """Every cell of the benchmark grid: the scheme chosen is the cheapest estimate (a Triton
    scheme only below the two GEMMs), and its plan is that scheme's forced plan."""
    schemes = set()
    for k, n, r, m in GRID:
        plan = plan_lowrank(m, k, n, r, BF16, 132, DEFAULT_TUNABLES)
        est = scheme_estimates(m, k, n, r, BF16, 132, DEFAULT_TUNABLES)
        assert est[plan.scheme] == min(est.values()) or plan.scheme == "torch"
        if plan.scheme == "torch":
            assert min(est["splitk"], est["tiled"]) >= est["torch"]
        else:
            forced = plan_lowrank(m, k, n, r, BF16, 132, LowrankTunables(force_scheme=plan.scheme))
            assert plan == forced
        schemes.add(plan.scheme)
    assert {"torch", "splitk", "tiled"} <= schemes  # each scheme wins somewhere on the grid


def test_routing_follows_the_model_and_its_margin():
    cell = (1, 2048, 8192, 128)  # decode: split-K is estimated a little under the two GEMMs
    m, k, n, r = cell
    assert plan_lowrank(m, k, n, r, BF16, 132).scheme == "splitk"
    demanding = LowrankTunables(cost_model=dataclasses.replace(lc.DEFAULT_COST_MODEL, margin=1.5))
    assert plan_lowrank(m, k, n, r, BF16, 132, demanding).scheme == "torch"
    # Free kernel boundaries and round trips: the fused kernels win every decode cell.
    cheap = dataclasses.replace(lc.DEFAULT_COST_MODEL, launch_us=0.0, round_trip_us=0.01)
    fused = LowrankTunables(cost_model=cheap)
    assert all(plan_lowrank(1, k, n, r, BF16, 132, fused).triton for k, n, r, _ in GRID)
    # Free GEMMs: torch everywhere.
    free = LowrankTunables(cost_model=dataclasses.replace(lc.DEFAULT_COST_MODEL, gemm_fixed_us=0.0, gemm_bandwidth=1.0))
    assert not any(plan_lowrank(m, k, n, r, BF16, 132, free).triton for k, n, r, m in GRID if m == 1)


def test_scheme_never_depends_on_occupancy():
    """Re-sizing the grids from the compiled kernels' occupancy cannot switch the scheme."""
    for k, n, r, m in GRID:
        assumed = plan_lowrank(m, k, n, r, BF16, 132)
        for occupancy in ((1, 1), (8, 8)):
            sized = plan_lowrank(m, k, n, r, BF16, 132, DEFAULT_TUNABLES, occupancy)
            assert sized.scheme == assumed.scheme
            assert (sized.block_m, sized.r_pad, sized.num_warps) == (assumed.block_m, assumed.r_pad, assumed.num_warps)


def test_interpreter_plans_by_the_rules_and_cuda_by_the_model(monkeypatch):
    m, k, n, r = 4096, 8192, 2048, 128  # the model routes it to cuBLAS, the rules to the tiled kernel
    cpu = _lowrank_launch.plan_for(m, k, n, r, BF16, torch.device("cpu"), DEFAULT_TUNABLES)
    assert cpu == plan_lowrank(m, k, n, r, BF16, DEFAULT_TUNABLES.interpreter_sms, DEFAULT_TUNABLES.rules_only())
    assert cpu.scheme == "tiled"
    monkeypatch.setattr(_lowrank_launch, "_sms", lambda device, tunables: 132)
    cuda = _lowrank_launch.plan_for(m, k, n, r, BF16, torch.device("cuda", 0), DEFAULT_TUNABLES)
    assert cuda.scheme == "torch" == plan_lowrank(m, k, n, r, BF16, 132).scheme
    assert DEFAULT_TUNABLES.rules_only() is DEFAULT_TUNABLES.rules_only()  # one shared object (plan cache)
    assert DEFAULT_TUNABLES.rules_only().cost_model is None


def test_other_dtypes_are_estimated_by_their_own_peaks():
    """fp32 runs FMA products and fp32 GEMMs; fp16's torch scheme pays fp32 GEMMs and four casts."""
    m, k, n, r = 4096, 2048, 8192, 128
    model = lc.DEFAULT_COST_MODEL
    bf16, fp16, fp32 = (lc.two_gemms_us(m, k, n, r, d, model) for d in (BF16, torch.float16, torch.float32))
    assert bf16 < fp32 < fp16
    plan = plan_lowrank(m, k, n, r, torch.float32, 132, LowrankTunables(force_scheme="tiled"))
    assert lc.fused_us(plan, m, k, n, r, torch.float32, 132, model) > lc.fused_us(plan, m, k, n, r, BF16, 132, model)
    with pytest.raises(ValueError, match=r"scheme 'torch' is not a Triton plan; allowed: splitk, tiled"):
        lc.fused_us(plan_lowrank(m, k, n, r, BF16, 132), m, k, n, r, BF16, 132, model)


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"launch_us": -1.0}, r"launch_us -1.0 is out of range; allowed: a number >= 0"),
        ({"hbm_gbps": 0.0}, r"hbm_gbps 0.0 is out of range; allowed: a number > 0"),
        ({"gemm_bandwidth": 1.5}, r"gemm_bandwidth 1.5 is out of range; allowed: a number in \(0, 1\]"),
        ({"wgmma_efficiency": float("nan")}, r"wgmma_efficiency nan is not a finite number"),
        ({"margin": "1"}, r"margin '1' is not a finite number"),
    ],
)
def test_cost_model_rejects_bad_constants(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        dataclasses.replace(lc.DEFAULT_COST_MODEL, **change)


def test_cost_model_round_trips_and_names_unknown_keys():
    model = dataclasses.replace(lc.DEFAULT_COST_MODEL, launch_us=3.0)
    assert lc.LowrankCostModel.from_dict(model.to_dict()) == model
    with pytest.raises(ValueError, match=r"cost model keys \['launch'\] are not constants; allowed: "):
        lc.LowrankCostModel.from_dict({"launch": 1.0})
    with pytest.raises(TypeError, match=r"cost_model 3 is not a LowrankCostModel \(or None for the rules\)"):
        LowrankTunables(cost_model=3)  # type: ignore[arg-type]


TRUE = dataclasses.replace(
    lc.DEFAULT_COST_MODEL,
    launch_us=3.1,
    expand_launch_us=0.9,  # the expand grid's boundary mostly hidden (as PDL might): fitted apart
    round_trip_us=0.55,
    l2_gbps=7000.0,
    wgmma_efficiency=0.6,
    mma_sync_efficiency=0.3,
    gemm_fixed_us=2.9,
    gemm_bandwidth=0.8,
)


def _synthetic_result(model: lc.LowrankCostModel, noise: float = 0.0) -> dict:
    """A benchmark JSON whose times are ``model``'s estimates (times a deterministic +-noise)."""
    rows = []
    rules = LowrankTunables(cost_model=None)
    for i, (k, n, r, m) in enumerate(GRID):
        wobble = 1.0 + noise * (1 if i % 2 else -1)
        row = {"m": m, "in": k, "out": n, "r": r, "correct": True}
        row["two_gemms_graph_us"] = lc.two_gemms_us(m, k, n, r, BF16, model) * wobble
        for scheme in ("splitk", "tiled"):
            plan = plan_lowrank(m, k, n, r, BF16, 132, dataclasses.replace(rules, force_scheme=scheme))
            row[f"{scheme}_graph_us"] = lc.fused_us(plan, m, k, n, r, BF16, 132, model) / wobble
        rows.append(row)
    rows.append({"m": 1, "in": 8, "out": 8, "r": 2, "correct": False})  # an incorrect cell is never fitted
    return {"config": jsonable(bench.LowrankBenchConfig()), "rows": rows, "sms": 132}


def test_fit_recovers_the_model_behind_the_times():
    data = _synthetic_result(TRUE)
    points = bench.measured_points(data)
    assert len(points) == 3 * len(GRID)
    fitted = lc.fit(points)
    assert lc.log_error(fitted, points) < 1e-4 and lc.log_error(lc.DEFAULT_COST_MODEL, points) > 0.1
    # The measured ceilings are not fitted.
    assert (fitted.hbm_gbps, fitted.matmul_tflops_16, fitted.margin) == (4220.0, 686.0, 1.0)
    # Every constant the times depend on comes back, the two boundary costs apart (coordinate
    # steps alone stopped 15% and 41% off them, in the valley where they trade).
    for name in (*lc.FUSED_CONSTANTS, *lc.GEMM_CONSTANTS):
        assert abs(getattr(fitted, name) / getattr(TRUE, name) - 1) < 0.01, name


def test_fit_is_never_worse_than_its_start_and_rejects_bad_points():
    points = bench.measured_points(_synthetic_result(TRUE, noise=0.2))
    assert lc.log_error(lc.fit(points), points) <= lc.log_error(lc.DEFAULT_COST_MODEL, points)
    assert lc.fit([]) == lc.DEFAULT_COST_MODEL
    bad = dataclasses.replace(points[0], us=0.0)
    with pytest.raises(ValueError, match=r"measured time 0.0 us of torch is not a positive finite number"):
        lc.fit([bad])
    with pytest.raises(ValueError, match=r"measured schemes \['dense'\] cannot be fitted"):
        lc.fit([dataclasses.replace(points[0], scheme="dense")])


def test_calibration_routes_each_cell_to_its_fastest_measured_scheme():
    out = bench.calibrate(_synthetic_result(TRUE))
    assert out["points"] == 3 * len(GRID) and len(out["cells"]) == len(GRID)
    assert all(out["rms_log_error"]["fitted"][s] < out["rms_log_error"]["start"][s] for s in ("torch", "splitk"))
    agree = sum(c["fitted_scheme"] == c["best_measured"] for c in out["cells"])
    assert agree >= 0.9 * len(GRID)
    assert out["graph_geomean"]["fitted"] >= 0.99
    assert lc.LowrankCostModel.from_dict(out["fitted"]) == lc.fit(bench.measured_points(_synthetic_result(TRUE)))


def test_calibration_refuses_a_file_without_its_fields():
    with pytest.raises(ValueError, match=r"has no config or rows"):
        bench.measured_points({"rows": []})
    data = _synthetic_result(TRUE)
    data.pop("sms")
    with pytest.raises(ValueError, match=r"sms None is not a positive SM count"):
        bench.measured_points(data)


def _script():
    spec = importlib.util.spec_from_file_location("calibrate_lowrank", ROOT / "benchmarks" / "calibrate_lowrank.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibrate_script_prints_the_fitted_model(tmp_path, capsys):
    path = tmp_path / "lowrank.json"
    path.write_text(json.dumps(_synthetic_result(TRUE)))
    assert _script().main([str(path), "--json", str(tmp_path / "fit.json")]) == 0
    out = capsys.readouterr().out
    assert "fitted: LowrankCostModel(" in out and "| 2048 -> 8192 | 128 | 1 |" in out
    assert json.loads((tmp_path / "fit.json").read_text())["points"] == 3 * len(GRID)
    path.write_text("{}")
    assert _script().main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config or rows" in err


def test_load_cost_model_reads_a_calibration_or_plain_constants(tmp_path):
    fitted = dataclasses.replace(lc.DEFAULT_COST_MODEL, launch_us=3.0)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"points": 3, "fitted": fitted.to_dict()}))
    assert lc.load_cost_model(calibration) == fitted
    plain = tmp_path / "model.json"
    plain.write_text(json.dumps({"launch_us": 1, "hbm_gbps": 3350}))  # integers are fine
    model = lc.load_cost_model(plain)
    assert model.launch_us == 1.0 and isinstance(model.hbm_gbps, float)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds no object of constants"):
        lc.load_cost_model(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot be read as JSON"):
        lc.load_cost_model(bad)
    bad.write_text(json.dumps({"launch_us": "fast"}))
    with pytest.raises(ValueError, match=r"launch_us 'fast' is not a finite number"):
        lc.load_cost_model(bad)


def test_truncated_linear_plans_with_its_own_tunables(monkeypatch):
    """A layer's ``tunables`` reach the planner: here a forced tiled scheme in the interpreter."""
    from fasttrunc.linear import TruncatedLinear

    monkeypatch.setenv("FASTTRUNC_BACKEND", "triton")
    layer = TruncatedLinear(40, 30, 6)
    assert layer.tunables is None
    layer.tunables = LowrankTunables(force_scheme="tiled", min_k_chunk=16)
    x = torch.randn(5, 40)
    with torch.no_grad():
        y = layer(x)
    assert any(
        key[-1] is layer.tunables and prepared.plan.scheme == "tiled"
        for key, prepared in _lowrank_launch._PREPARED.items()
    )
    torch.testing.assert_close(y, x @ layer.weight.T + layer.bias, rtol=1e-5, atol=1e-5)
    layer.tunables = "fast"  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"tunables 'fast' is not a LowrankTunables"):
        layer(x)
