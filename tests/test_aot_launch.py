"""The light eager launch path driven with a real CompiledKernel, without a GPU.

Each split-K and tiled kernel step is compiled ahead of time for sm_90 (a real Triton
``CompiledKernel``); module loading and the C launcher are stubbed, so everything between
``KernelStep`` and the driver runs as it would on a GPU: the first call goes through the (stubbed)
JIT launch, later calls through the compiled kernel's runner, which reads ``grid[0..2]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, sys
import torch
from triton.runtime.driver import driver
from fasttrunc.kernels import aot, _lowrank_launch as L
from fasttrunc.kernels.lowrank_plan import LowrankTunables, plan_lowrank

class FakeDriver:  # what the compiled runner asks for the current device and stream
    def get_current_device(self):
        return 0
    def get_current_stream(self, device):
        return 1234
    def is_active(self):
        return True

driver.set_active(FakeDriver())
report = {}
for force in ("splitk", "tiled"):
    m, k, n, r = 16, 256, 128, 32
    tunables = LowrankTunables(min_k_chunk=16, force_scheme=force)
    plan = plan_lowrank(m, k, n, r, torch.float16, 132, tunables)
    logs = []  # each step's runner launches
    steps = L.build_steps(plan, torch.float16, True, {"m": m, "k": k, "n": n, "r": r, "sx": k, "sa": k, "sb": r})
    for step in steps:
        kernel = step.kernel
        names = [a for a in kernel.arg_names if a not in step.constexprs]
        pointers = [a for a in names if a.endswith("_ptr")]
        args = dict.fromkeys(pointers) | dict(zip([a for a in names if not a.endswith("_ptr")], step.ints))
        types = {a: "*fp32" if a == "ws_ptr" else "*fp16" for a in pointers}
        compiled = aot.compile_kernel(kernel, args, step.constexprs, step.options, types)
        launches = []
        compiled.module, compiled.function = "loaded", 7  # no module loading
        compiled._run = lambda *a, log=launches: log.append(a)  # the C launcher (this step's log)
        jit_calls = []

        class Jit:  # kernel[grid](...) as the first launch makes it: compiles, launches, returns the kernel
            arg_names = kernel.arg_names
            __name__ = kernel.__name__
            def __getitem__(self, grid):
                return lambda *a, compiled=compiled, **kw: jit_calls.append(grid) or compiled

        step.kernel = Jit()
        tensors = [torch.zeros(64) for _ in pointers]
        aligned = L.ALL_ALIGNED  # the pattern of the caller's four operands, as _launch passes it
        step(tensors, aligned)
        step(tensors, aligned)
        step(tensors, aligned)
        one_d = None
        try:
            compiled[(step.grid[0],)](*tensors, *step.tail)
        except IndexError as exc:
            one_d = repr(exc)
        report[f"{force}:{kernel.__name__}"] = {
            "grid": list(step.grid),
            "fast": step.fast,
            "jit_calls": len(jit_calls),
            "launches": [[a[0], a[1], a[2], a[3], a[4], len(a) - 9] for a in launches],
            "trailing": list(a if isinstance(a, (int, float, bool, str)) else str(a) for a in launches[0][9 + len(tensors) + len(step.ints):]) if launches else None,
            "expected_trailing": [v if isinstance(v, (int, float, bool, str)) else str(v) for v in step.tail[len(step.ints):]],
            "n_args": len(tensors) + len(step.tail),
            "one_d_grid_error": one_d,
        }
        logs.append(launches)
    # The bound launch of a repeated eager call: all operands aligned, each step's runner called
    # directly (no KernelStep dispatch), the same grid and arguments as the steps' own launches.
    L.is_cuda, L.cuda_device_count = (lambda device: True), (lambda: 1)
    x, a, b, bias = torch.zeros(m, k).half(), torch.zeros(r, k).half(), torch.zeros(n, r).half(), torch.zeros(n).half()
    bound = L.BoundLaunch(tunables, L.PreparedLaunch(plan, steps), x, n)
    before = [len(log) for log in logs]
    for _ in range(2):
        y = L.run_bound(bound, x, a, b, bias)
    report[f"{force}:bound"] = {
        "direct": bound.direct is not None and len(bound.direct) == len(steps),
        "new_launches": [len(log) - n0 for log, n0 in zip(logs, before)],
        "grids_match": all(list(l[:3]) == list(step.grid) for step, log in zip(steps, logs) for l in log),
        "y_shape": list(y.shape),
        "expected_shape": [m, n],
    }
json.dump(report, sys.stdout)
"""


@pytest.mark.aot
def test_light_launch_path_works_on_a_real_compiled_kernel(tmp_path):
    """Hazard: a 1-tuple grid made the compiled runner raise IndexError on grid[1]; the path then
    disabled itself and every eager call paid Triton's full launch. Here two of three calls must
    go through the runner with the plan's 3-D grid and every argument, constexprs last."""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report) == {
        "splitk:lowrank_shrink_kernel",
        "splitk:lowrank_expand_kernel",
        "tiled:lowrank_tiled_kernel",
        "splitk:bound",
        "tiled:bound",
    }
    for force in ("splitk", "tiled"):
        bound = report.pop(f"{force}:bound")
        assert bound["direct"] and bound["grids_match"], bound
        assert bound["new_launches"] == [2] * (2 if force == "splitk" else 1), bound
        assert bound["y_shape"] == bound["expected_shape"], bound
    for name, r in report.items():
        assert r["fast"], name
        assert r["jit_calls"] == 1, name  # the first call only
        assert len(r["launches"]) == 2, name  # the later two through the compiled runner
        for grid0, grid1, grid2, stream, function, n_args in r["launches"]:
            assert [grid0, grid1, grid2] == r["grid"] and grid0 >= 1, name
            assert stream == 1234 and function == 7 and n_args == r["n_args"], name
        assert r["trailing"] == r["expected_trailing"], name
        assert r["one_d_grid_error"] and "IndexError" in r["one_d_grid_error"], name
