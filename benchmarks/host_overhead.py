"""Host time per eager call of the low-rank linear with the GPU launch stubbed, on this CPU.

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py [--calls N] [--json PATH]
    TRITON_INTERPRET=1 python benchmarks/host_overhead.py --against REV   # run_bound, A/B in one process

Measures the Python path a decode step pays per layer, up to the compiled kernel's runner, which
is replaced by a no-op (so no device time is counted; for the torch scheme the two GEMMs are
the no-op, so the row is what fasttrunc adds in front of cuBLAS): for a repeated call signature the bound
launch (signature lookup, backend rule, output / workspace allocation, the runners called
directly), with one visible GPU (no device guard) and with several (the guard, stubbed to a
no-op here); and, timed in the same run for the ratio, the full path every first call takes
(checks, dispatch, prepared-launch lookup, strides, reshapes). CPU
tensors stand in for CUDA ones: ``torch.empty`` on CUDA, the CUDA device guard and the runner's
own work (stream lookup, argument packing in Triton's C launcher) are not in this number. Needs TRITON_INTERPRET=1 (for the CPU tensors to take the Triton path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


class _NeverBinds(dict):  # type: ignore[type-arg]
    """A BOUND registry that keeps nothing: every call takes the full path (checks, plan lookup)."""

    def __setitem__(self, key: object, value: object) -> None:
        return None


# (name, visible CUDA devices, bound launches kept): what each row of the result measures.
VARIANTS = (
    ("bound", 1, True),  # one GPU (the H200 machine): the current device needs no guard
    ("bound_guarded", 2, True),  # several GPUs: a device guard around the launches (stubbed no-op)
    ("full_path", 1, False),  # every call checked and planned: the path before binding
)


def _cell(scheme: str, m: int) -> tuple[Any, Any, Any, Any, tuple[Any, ...]]:
    """One timed cell, 2048 -> 8192 at rank 128 in fp32: its tunables, x, a, b and launch key."""
    import torch

    from fasttrunc.kernels.lowrank_plan import LowrankTunables

    tunables = LowrankTunables(force_scheme=scheme)
    x, a, b = torch.randn(m, 2048), torch.randn(128, 2048), torch.randn(8192, 128)
    return tunables, x, a, b, (m, 2048, 8192, 128, torch.float32, x.device, False, 2048, 2048, 128, tunables)


def _stub_runners(steps: Any, all_aligned: tuple[bool, ...]) -> None:
    for step in steps:
        step.runners = {all_aligned: lambda *args: None}


def measure(calls: int = 20000, repeats: int = 7) -> dict[str, Any]:
    """Median microseconds per call (CPU and wall), per scheme and variant, with the runner stubbed."""
    import torch

    from fasttrunc.kernels import _lowrank_launch
    from fasttrunc.kernels.lowrank import lowrank_linear

    saved_env = os.environ.get("FASTTRUNC_BACKEND")
    os.environ["FASTTRUNC_BACKEND"] = "triton"
    saved = _lowrank_launch.is_cuda, _lowrank_launch.device_guard, _lowrank_launch.cuda_device_count
    saved_bound, saved_gemms = _lowrank_launch.BOUND, _lowrank_launch.two_gemms
    # The CUDA path of the launcher on CPU tensors: a reusable no-op guard, and every step's
    # runner a no-op (set after the first call, which goes through the interpreter).
    _lowrank_launch.is_cuda = lambda device: True
    _lowrank_launch.device_guard = lambda device: contextlib.nullcontext()
    results: dict[str, Any] = {}
    try:
        with torch.no_grad():
            # The torch scheme (the cost planner's choice for most cells) with its GEMMs stubbed:
            # what fasttrunc adds in front of cuBLAS's own launches.
            _lowrank_launch.two_gemms = lambda x, a, b, bias: x
            for scheme, m in (("splitk", 1), ("tiled", 512), ("torch", 1)):
                tunables, x, a, b, key = _cell(scheme, m)
                results[scheme] = {}
                for name, devices, binds in VARIANTS:
                    _lowrank_launch.cuda_device_count = lambda devices=devices: devices
                    _lowrank_launch.BOUND = {} if binds else _NeverBinds()
                    lowrank_linear(x, a, b, tunables=tunables)
                    _stub_runners(_lowrank_launch._PREPARED[key].steps, _lowrank_launch.ALL_ALIGNED)
                    wall, cpu = [], []
                    for _ in range(repeats):
                        start, start_cpu = time.perf_counter(), time.process_time()
                        for _ in range(calls):
                            lowrank_linear(x, a, b, tunables=tunables)
                        cpu.append((time.process_time() - start_cpu) / calls)
                        wall.append((time.perf_counter() - start) / calls)
                    # CPU time of this process: what a shared, loaded machine distorts least.
                    results[scheme][name] = {
                        "wall_us": 1e6 * statistics.median(wall),
                        "cpu_us": 1e6 * statistics.median(cpu),
                    }
    finally:
        _lowrank_launch.is_cuda, _lowrank_launch.device_guard, _lowrank_launch.cuda_device_count = saved
        _lowrank_launch.BOUND, _lowrank_launch.two_gemms = saved_bound, saved_gemms
        if saved_env is None:
            os.environ.pop("FASTTRUNC_BACKEND", None)
        else:
            os.environ["FASTTRUNC_BACKEND"] = saved_env
    return {"us_per_call": results, "calls": calls, "repeats": repeats}


def compare_bound(rev: str, calls: int = 20000, rounds: int = 9) -> dict[str, dict[str, float]]:
    """``run_bound`` alone, this tree's ``_lowrank_launch`` against the one at git revision ``rev``,
    in one process, interleaved round by round (machine load moves both alike): median
    microseconds per call of each, per scheme, the steps' runners stubbed, one visible device."""
    import functools
    import importlib.util
    import subprocess
    import tempfile
    import timeit

    from fasttrunc.kernels import _lowrank_launch as current

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:kernels/_lowrank_launch.py"], cwd=root, capture_output=True, text=True
    )
    if source.returncode != 0:
        raise ValueError(f"revision {rev!r} has no kernels/_lowrank_launch.py: {source.stderr.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "_lowrank_launch_then.py"
        path.write_text(source.stdout)
        spec = importlib.util.spec_from_file_location("fasttrunc.kernels._lowrank_launch_then", path)
        assert spec is not None and spec.loader is not None
        then = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(then)
    modules = {"current": current, rev: then}
    saved = {name: (mod.is_cuda, mod.cuda_device_count) for name, mod in modules.items()}
    results: dict[str, dict[str, float]] = {}
    try:
        for mod in modules.values():
            mod.is_cuda, mod.cuda_device_count = (lambda device: True), (lambda: 1)
        for scheme, m in (("splitk", 1), ("tiled", 512)):
            tunables, x, a, b, key = _cell(scheme, m)
            bounds = {}
            for name, mod in modules.items():
                prepared = mod.prepare(key)
                _stub_runners(prepared.steps, mod.ALL_ALIGNED)
                bounds[name] = (mod, mod.BoundLaunch(tunables, prepared, x, 8192))
            times: dict[str, list[float]] = {name: [] for name in modules}
            for i in range(rounds):
                for name in modules if i % 2 else reversed(list(modules)):
                    mod, bound = bounds[name]
                    call = functools.partial(mod.run_bound, bound, x, a, b, None)
                    best = min(timeit.repeat(call, number=calls, repeat=3))
                    times[name].append(1e6 * best / calls)
            results[scheme] = {name: statistics.median(v) for name, v in times.items()}
    finally:
        for name, mod in modules.items():
            mod.is_cuda, mod.cuda_device_count = saved[name]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--against", metavar="REV", default=None, help="time run_bound alone against the one at git revision REV"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("host_overhead.py needs TRITON_INTERPRET=1 (CPU tensors stand in for CUDA ones)", file=sys.stderr)
        return 2
    if args.against is not None:
        try:
            compared = compare_bound(args.against, args.calls)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        for scheme, us in compared.items():
            print(f"{scheme} run_bound: " + ", ".join(f"{name} {v:.2f} us" for name, v in us.items()))
        return 0
    data = measure(args.calls)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    for scheme, variants in data["us_per_call"].items():
        full = variants["full_path"]["cpu_us"]
        for name, us in variants.items():
            print(
                f"{scheme} {name}: {us['cpu_us']:.2f} us of CPU time ({us['wall_us']:.2f} us wall) per call, "
                f"launch stubbed; {full / us['cpu_us']:.2f}x faster than the full path"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
