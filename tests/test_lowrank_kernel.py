"""The fused low-rank linear kernel against its torch reference.

On a CPU these run Triton's interpreter (conftest sets TRITON_INTERPRET=1); with
FASTTRUNC_TEST_NATIVE=1 on a CUDA machine the same tests run the compiled kernels on the GPU, and
the `gpu` tests (bf16, CUDA graphs, Pythia-sized shapes) run too. Every test that plans passes its
tunables explicitly: nothing here changes module state.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import fasttrunc
from fasttrunc.kernels import _lowrank_autograd, _lowrank_launch
from fasttrunc.kernels import lowrank as lk
from fasttrunc.kernels.lowrank_plan import DEFAULT_TUNABLES, LowrankTunables, plan_lowrank
from fasttrunc.kernels.lowrank_reference import lowrank_backward
from fasttrunc.kernels.tolerances import LOWRANK_RTOL as RTOL

NATIVE = os.environ.get("FASTTRUNC_TEST_NATIVE", "0") == "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda") if NATIVE else torch.device("cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if NATIVE else [])
# Small split-K chunks, so that tiny shapes use several splits.
SMALL = LowrankTunables(min_k_chunk=16)

pytestmark = pytest.mark.skipif(
    not NATIVE and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)


def _sms(tunables):
    return _lowrank_launch._sms(DEVICE, tunables)


def _plan(m, k, n, r, dtype, tunables):
    return plan_lowrank(m, k, n, r, dtype, _sms(tunables), tunables)


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    """Force the Triton path (the CPU tensors of the interpreter included)."""
    monkeypatch.setenv("FASTTRUNC_BACKEND", "triton")


@pytest.fixture(params=["splitk", "tiled"])
def scheme(request):
    """Tunables that route every M to one kernel."""
    return LowrankTunables(min_k_chunk=16, force_scheme=request.param)


def _operands(m, k, n, r, dtype, bias=True, lead=()):
    x = torch.randn(*lead, m, k, device=DEVICE).to(dtype)
    a = (torch.randn(r, k, device=DEVICE) / max(k, 1) ** 0.5).to(dtype)
    b = (torch.randn(n, r, device=DEVICE) / max(r, 1) ** 0.5).to(dtype)
    bb = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    return x, a, b, bb


def _rel_err(y, x, a, b, bias):
    ref = lk.lowrank_linear_reference(x.double(), a.double(), b.double(), None if bias is None else bias.double())
    assert y.shape == ref.shape and y.dtype == x.dtype
    denom = ref.norm().item()
    return (y.double() - ref).norm().item() / (denom if denom > 0 else 1.0)


# M x (in, out) x r: every value of each list appears, in / out cycle through odd sizes.
_MS = [1, 3, 17, 64]
_RS = [1, 7, 16, 40]
_IO = [(5, 33), (33, 100), (100, 5), (100, 100)]
SHAPES = [(m, *_IO[i % len(_IO)], r) for i, (m, r) in enumerate(itertools.product(_MS, _RS))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_matches_reference(scheme, dtype, m, k, n, r):
    x, a, b, bias = _operands(m, k, n, r, dtype, bias=(m + r) % 2 == 0)
    assert _plan(m, k, n, r, dtype, scheme).scheme == scheme.force_scheme
    y = fasttrunc.lowrank_linear(x, a, b, bias, tunables=scheme)
    assert _rel_err(y, x, a, b, bias) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_rank_and_many_rows(scheme, dtype):
    """r = 300 pads to 512 (narrow tiles, h tile capped at 32 rows): M = 300 spans many M tiles."""
    x, a, b, bias = _operands(300, 70, 45, 300, dtype)
    cfg = _plan(300, 70, 45, 300, dtype, scheme)
    assert cfg.scheme == scheme.force_scheme and -(-300 // cfg.block_m) > 1
    assert _rel_err(fasttrunc.lowrank_linear(x, a, b, bias, tunables=scheme), x, a, b, bias) < RTOL[dtype]


# The planner by its rules alone (what the interpreter plans with): no cost model.
RULES = DEFAULT_TUNABLES.rules_only()


def test_default_threshold_routes_by_rows():
    t = RULES
    assert _plan(t.decode_max_m, 64, 64, 8, torch.float16, t).scheme == "splitk"
    assert _plan(t.decode_max_m + 1, 64, 64, 8, torch.float16, t).scheme == "tiled"


def test_planner_is_a_pure_function_of_its_arguments():
    """Tunables are frozen and part of the arguments: two tunables, two plans, nothing global moves."""
    wide = LowrankTunables(decode_max_m=1024, cost_model=None)
    assert plan_lowrank(512, 64, 64, 8, torch.float16, 132, wide).scheme == "splitk"
    assert plan_lowrank(512, 64, 64, 8, torch.float16, 132, RULES).scheme == "tiled"
    with pytest.raises(AttributeError):
        wide.decode_max_m = 1  # frozen
    # More SMs, more programs: the SM count is an argument, not probed.
    few = plan_lowrank(1, 4096, 4096, 64, torch.bfloat16, 8, RULES)
    many = plan_lowrank(1, 4096, 4096, 64, torch.bfloat16, 132, RULES)
    assert sum(g[0] for g in few.grids) < sum(g[0] for g in many.grids)
    for plan in (few, many, plan_lowrank(4096, 2048, 8192, 128, torch.bfloat16, 132, RULES)):
        assert plan.grids and all(len(g) == 3 and g[1:] == (1, 1) for g in plan.grids)


def test_ctas_per_sm_counts_registers_shared_memory_and_threads():
    from fasttrunc.kernels.lowrank_plan import SmLimits, ctas_per_sm

    # Registers: 255 per thread round up to 256 (8192 per warp); 8 warps fill the register file once.
    assert ctas_per_sm(255, 0, 8) == 1
    assert ctas_per_sm(128, 0, 4) == 4  # 4096 per warp, 16 warps
    assert ctas_per_sm(110, 33 * 1024, 8) == 2  # 110 -> 112 per thread: 3584 per warp, 28672 per CTA
    assert ctas_per_sm(40, 100 * 1024, 4) == 2  # shared memory binds: 2 x (100 KB + 1 KB) <= 228 KB
    assert ctas_per_sm(16, 0, 1) == 32  # the CTA cap
    assert ctas_per_sm(32, 0, 8) == 8  # threads: 2048 / 256
    assert ctas_per_sm(64, 300 * 1024, 4) == 1  # never below one: a launch always runs
    assert ctas_per_sm(128, 0, 4, SmLimits(registers=32768)) == 2


def test_occupancy_caps_the_grids_not_the_tiles():
    """A launch gets at most its compiled kernel's CTAs per SM (one wave); tiles, warps and stages stay."""
    # 2048 -> 8192 at r = 512, M = 256: 48 shrink programs, 264 expand programs (2 per SM) assumed.
    assumed = plan_lowrank(256, 2048, 8192, 512, torch.bfloat16, 132, RULES)
    one = plan_lowrank(256, 2048, 8192, 512, torch.bfloat16, 132, RULES, (1, 1))
    assert assumed.scheme == one.scheme == "splitk"
    same = ("block_m", "block_k", "block_n", "r_pad", "num_warps", "num_stages", "split_block")
    assert all(getattr(one, f) == getattr(assumed, f) for f in same)
    assert assumed.grids[1][0] > 132 >= one.grids[1][0]  # expand: one wave of one CTA per SM
    assert one.grids[0] == assumed.grids[0]  # shrink: 48 programs fit either way
    # Each launch has its own count; more room than programs_per_sm asks for changes nothing.
    assert plan_lowrank(256, 2048, 8192, 512, torch.bfloat16, 132, RULES, (1, 2)) == assumed
    assert plan_lowrank(256, 2048, 8192, 512, torch.bfloat16, 132, RULES, (8, 8)) == assumed
    shrink_bound = plan_lowrank(1, 8192, 2048, 128, torch.bfloat16, 8, RULES, (1, 2))
    assert shrink_bound.grids[0][0] <= 8 < plan_lowrank(1, 8192, 2048, 128, torch.bfloat16, 8, RULES).grids[0][0]


@pytest.mark.parametrize(
    "supported,pdl,expected",
    [(True, True, True), (False, True, False), (True, False, False)],
    ids=["sm90", "sm80", "off"],
)
def test_expand_grid_uses_programmatic_dependent_launch_on_sm90(monkeypatch, supported, pdl, expected):
    """On sm_90+ the split-K shrink signals its dependents (GDC) and the expand grid is launched
    with launch_pdl and waits first; elsewhere, or with pdl=False, both launch plainly."""
    monkeypatch.setattr(_lowrank_launch, "_sms", lambda device, tunables: 132)
    monkeypatch.setattr(_lowrank_launch, "supports_pdl", lambda device: supported)
    cuda = torch.device("cuda", 0)
    t = LowrankTunables(force_scheme="splitk", pdl=pdl)
    key = (1, 2048, 8192, 128, torch.bfloat16, cuda, False, 2048, 2048, 128, t)
    try:
        shrink, expand = _lowrank_launch.prepare(key).steps
    finally:
        _lowrank_launch._PREPARED.pop(key, None)
    assert shrink.constexprs["GDC"] is expected and expand.constexprs["GDC"] is expected
    assert list(expand.constexprs)[-1] == "GDC"  # the runner takes constexprs positionally, GDC last
    assert expand.options.get("launch_pdl", False) is expected and "launch_pdl" not in shrink.options
    # The tiled kernel is one launch: nothing to overlap.
    tiled_key = (
        4096,
        2048,
        8192,
        128,
        torch.bfloat16,
        cuda,
        False,
        2048,
        2048,
        128,
        LowrankTunables(pdl=pdl, cost_model=None),
    )
    try:
        (tiled,) = _lowrank_launch.prepare(tiled_key).steps
    finally:
        _lowrank_launch._PREPARED.pop(tiled_key, None)
    assert "GDC" not in tiled.constexprs and "launch_pdl" not in tiled.options


def test_pdl_must_be_a_bool():
    with pytest.raises(ValueError, match=r"pdl 'yes' is not a bool; allowed: True, False"):
        LowrankTunables(pdl="yes")


def test_grids_are_resized_from_the_compiled_kernels_after_the_first_launch(monkeypatch):
    """On CUDA the first launch uses the assumed programs per SM; the launcher then reads each
    compiled kernel's registers and shared memory and re-plans the key's grids (stubbed here)."""

    class Compiled:
        def __init__(self, n_regs, shared):
            self.n_regs, self.metadata = n_regs, type("Meta", (), {"shared": shared})()

    monkeypatch.setattr(_lowrank_launch, "is_cuda", lambda device: True)
    monkeypatch.setattr(_lowrank_launch, "device_guard", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setattr(_lowrank_launch, "cuda_device_count", lambda: 1)
    from fasttrunc.kernels.lowrank_plan import H100_LIMITS

    monkeypatch.setattr(_lowrank_launch, "sm_limits", lambda device: H100_LIMITS)
    real_call = _lowrank_launch.KernelStep.__call__

    def launch(step, tensors, aligned):
        real_call(step, tensors, None)  # the interpreter computes it
        step.compiled = Compiled(64, 150 * 1024)  # 150 KB of shared memory: one CTA per SM

    monkeypatch.setattr(_lowrank_launch.KernelStep, "__call__", launch)
    t = LowrankTunables(min_k_chunk=16, force_scheme="splitk", programs_per_sm=2, interpreter_sms=4)
    x, a, b, bias = _operands(3, 512, 300, 7, torch.float32)
    key = (3, 512, 300, 7, torch.float32, x.device, True, 512, 512, 7, t)
    _lowrank_launch._PREPARED.pop(key, None)
    with torch.no_grad():
        y1 = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
        first = _lowrank_launch._PREPARED[key]
        assert first.sized
        assumed = plan_lowrank(3, 512, 300, 7, torch.float32, 4, t)
        assert first.plan == plan_lowrank(3, 512, 300, 7, torch.float32, 4, t, (1, 1))
        assert [g[0] for g in first.plan.grids] < [g[0] for g in assumed.grids]  # fewer programs: one per SM
        assert _bound_for(x, a, b, bias, t).steps == first.steps  # the bound launch uses the final grids
        y2 = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
    for y in (y1, y2):
        assert _rel_err(y, x, a, b, bias) < RTOL[torch.float32]


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"force_scheme": "fast"}, r"force_scheme 'fast' is not known; allowed: dense, torch, splitk, tiled"),
        ({"min_k_chunk": 0}, r"min_k_chunk 0 is out of range"),
        ({"max_fused_rank": 2048}, r"max_fused_rank 2048 is out of range; allowed: an integer in \[1, 1024\]"),
        ({"programs_per_sm": True}, r"programs_per_sm True is not an integer"),
    ],
)
def test_bad_tunables_are_one_line_errors(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        LowrankTunables(**change)


def test_functional_rejects_a_non_tunables_object():
    x, a, b, _ = _operands(3, 33, 5, 7, torch.float32)
    with pytest.raises(TypeError, match="tunables .* is not a LowrankTunables"):
        fasttrunc.lowrank_linear(x, a, b, tunables={"force_scheme": "tiled"})


@pytest.mark.parametrize("n_groups", [2, 4])
def test_splitk_is_reusable_and_deterministic(n_groups):
    """Several splits reduced SPLIT_BLOCK at a time, several column groups; repeated calls (other
    shapes in between) agree bit for bit."""
    t = LowrankTunables(min_k_chunk=16, force_scheme="splitk", programs_per_sm=1, interpreter_sms=n_groups)
    n = 64 * n_groups
    x, a, b, bias = _operands(17, 400, n, 7, torch.float16)
    cfg = _plan(17, 400, n, 7, torch.float16, t)
    if not NATIVE:  # the SM count of a real GPU decides the grid there
        assert cfg.n_split > 1 and cfg.n_groups == n_groups and cfg.split_block > 1
    y1 = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
    y_other = fasttrunc.lowrank_linear(x[:3, :], a, b, None, tunables=t)
    y2 = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
    assert torch.equal(y1, y2)
    assert _rel_err(y1, x, a, b, bias) < RTOL[torch.float16]
    assert _rel_err(y_other, x[:3], a, b, None) < RTOL[torch.float16]


def test_one_row_splitk_writes_and_sums_only_its_row():
    """M = 1 (decode): each partial is one row, not a padded BLOCK_M tile, so the expand kernel
    sums SPLIT_BLOCK = 8K / R_PAD of them a load; with more splits than that, several loads."""
    t = LowrankTunables(min_k_chunk=16, force_scheme="splitk", programs_per_sm=2, interpreter_sms=64)
    x, a, b, bias = _operands(1, 2000, 70, 400, torch.float32)
    one = _plan(1, 2000, 70, 400, torch.float32, t)
    two = _plan(2, 2000, 70, 400, torch.float32, t)
    assert one.ws_rows == 1 and two.ws_rows == two.block_m == 16
    assert one.split_block == 8192 // one.r_pad == 16 and two.split_block == 1
    if not NATIVE:  # the SM count of a real GPU decides the split there
        assert one.n_split > one.split_block
    y = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
    assert _rel_err(y, x, a, b, bias) < RTOL[torch.float32]
    y2 = fasttrunc.lowrank_linear(torch.cat([x, x]), a, b, bias, tunables=t)
    assert _rel_err(y2, torch.cat([x, x]), a, b, bias) < RTOL[torch.float32]


def test_one_row_workspace_holds_one_row_per_partial(monkeypatch):
    """At M = 1 the workspace is [N_SPLIT, R_PAD], not [N_SPLIT, BLOCK_M, R_PAD] (16x the bytes):
    the shrink writes each partial's row contiguously, and their sum is x @ a.T."""
    t = LowrankTunables(min_k_chunk=16, force_scheme="splitk", programs_per_sm=2, interpreter_sms=64)
    x, a, b, bias = _operands(1, 2000, 70, 400, torch.float32)
    plan = _plan(1, 2000, 70, 400, torch.float32, t)
    assert plan.ws_numel == plan.n_split * plan.r_pad
    seen = []
    real_call = _lowrank_launch.KernelStep.__call__

    def recording(step, tensors, aligned):
        real_call(step, tensors, aligned)
        if step.kernel.__name__ == "lowrank_shrink_kernel":
            seen.append(tensors[-1].clone())

    monkeypatch.setattr(_lowrank_launch.KernelStep, "__call__", recording)
    y = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
    assert _rel_err(y, x, a, b, bias) < RTOL[torch.float32]
    (ws,) = seen
    assert ws.numel() == plan.ws_numel
    parts = ws.view(plan.n_split, plan.r_pad)
    r = a.shape[0]  # 400, padded to 512
    torch.testing.assert_close(parts[:, :r].sum(0), (x.double() @ a.double().T)[0].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(parts[:, r:], torch.zeros_like(parts[:, r:]))  # the padded rank columns


def test_splitk_launches_in_flight_never_share_state(monkeypatch):
    """Hazard: one workspace (partials + counters) per device let two launches in flight mix their
    state. Each launch must own its workspace: while one launch's buffers are alive (in flight),
    another launch gets different memory, and no kernel takes a counter buffer."""
    t = LowrankTunables(min_k_chunk=16, force_scheme="splitk")
    seen = []
    real_call = _lowrank_launch.KernelStep.__call__

    def recording(step, tensors, aligned):
        seen.append((step.kernel, tuple(tensors)))  # keeps every buffer alive, as a launch in flight
        return real_call(step, tensors, aligned)

    monkeypatch.setattr(_lowrank_launch.KernelStep, "__call__", recording)
    x, a, b, bias = _operands(5, 64, 40, 7, torch.float32)
    for _ in range(3):
        y = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
        assert _rel_err(y, x, a, b, bias) < RTOL[torch.float32]
    shrink = [tensors for kernel, tensors in seen if kernel.__name__ == "lowrank_shrink_kernel"]
    expand = [tensors for kernel, tensors in seen if kernel.__name__ == "lowrank_expand_kernel"]
    assert len(shrink) == len(expand) == 3
    workspaces = [tensors[-1] for tensors in shrink]
    assert len({w.data_ptr() for w in workspaces}) == 3, "two launches in flight shared a workspace"
    assert all(e[0] is w for e, w in zip(expand, workspaces)), "expand must read its own launch's partials"
    int_buffers = [v for _, tensors in seen for v in tensors if not v.is_floating_point()]
    assert not int_buffers, "a kernel takes a counter buffer: state that outlives the launch"


def test_launches_run_under_the_tensors_device(monkeypatch):
    """Hazard: launches went to the current device. On CUDA every kernel step must run inside
    torch.cuda.device(<the tensors' device>); checked with CPU tensors standing in for CUDA ones."""
    events = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    monkeypatch.setattr(_lowrank_launch, "is_cuda", lambda device: True)
    monkeypatch.setattr(_lowrank_launch, "device_guard", Guard)
    monkeypatch.setattr(_lowrank_launch, "cuda_device_count", lambda: 2)  # several devices: guarded
    real_call = _lowrank_launch.KernelStep.__call__

    def launch(step, tensors, aligned):
        events.append(("launch", tensors[0].device))
        real_call(step, tensors, None)  # the interpreter runs it

    monkeypatch.setattr(_lowrank_launch.KernelStep, "__call__", launch)
    for force in ("splitk", "tiled"):
        events.clear()
        x, a, b, bias = _operands(3, 33, 20, 7, torch.float32)
        y = fasttrunc.lowrank_linear(x, a, b, bias, tunables=LowrankTunables(force_scheme=force))
        assert _bound_for(x, a, b, bias, LowrankTunables(force_scheme=force)) is not None  # equal tunables
        assert _rel_err(y, x, a, b, bias) < RTOL[torch.float32]
        kinds = [e[0] for e in events]
        assert kinds[0] == "enter" and kinds[-1] == "exit" and set(kinds[1:-1]) == {"launch"}, events
        assert events[0][1] == x.device
        # The second call of the same signature takes the bound path: the same guard around it.
        events.clear()
        y2 = fasttrunc.lowrank_linear(x, a, b, bias, tunables=LowrankTunables(force_scheme=force))
        kinds = [e[0] for e in events]
        assert kinds[0] == "enter" and kinds[-1] == "exit" and set(kinds[1:-1]) == {"launch"}, events
        assert torch.equal(y2, y)
    # One visible device is always the current one: the bound launch skips the guard.
    monkeypatch.setattr(_lowrank_launch, "cuda_device_count", lambda: 1)
    x, a, b, bias = _operands(2, 33, 20, 7, torch.float32)
    fasttrunc.lowrank_linear(x, a, b, bias, tunables=LowrankTunables(force_scheme="tiled"))
    events.clear()
    fasttrunc.lowrank_linear(x, a, b, bias, tunables=LowrankTunables(force_scheme="tiled"))
    assert [e[0] for e in events] == ["launch"], events
    guard = _lowrank_launch._device_guard_for(torch.device("cuda", 1))
    assert isinstance(guard, _lowrank_launch.CudaDeviceGuard) and guard.index == 1


def test_cuda_device_guard_switches_and_restores(monkeypatch):
    """The light guard makes its index current for the block and puts the previous one back."""
    current = [0]

    def exchange(index):
        previous, current[0] = current[0], index
        return previous

    def maybe_exchange(index):
        current[0] = index
        return index

    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", maybe_exchange)
    with _lowrank_launch.CudaDeviceGuard(1):
        assert current == [1]
        with _lowrank_launch.CudaDeviceGuard(2):
            assert current == [2]
        assert current == [1]
    assert current == [0]


def _bound_for(x, a, b, bias, tunables):
    return _lowrank_launch.BOUND.get(_lowrank_launch.signature(x, a, b, bias, tunables))


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)], ids=["2d", "3d", "4d"])
def test_bound_path_equals_the_first_call(scheme, lead):
    """A repeated eager call skips checks and planning (the bound launch) and gives the same bits."""
    x, a, b, bias = _operands(5, 40, 33, 7, torch.float32, lead=lead)
    with torch.no_grad():
        first = fasttrunc.lowrank_linear(x, a, b, bias, tunables=scheme)
        bound = _bound_for(x, a, b, bias, scheme)
        assert bound is not None and bound.out_shape == (*lead, 5, 33)
        for _ in range(2):
            assert torch.equal(fasttrunc.lowrank_linear(x, a, b, bias, tunables=scheme), first)
        x2 = torch.randn_like(x)  # new values, same signature: the bound launch computes them
        assert _rel_err(fasttrunc.lowrank_linear(x2, a, b, bias, tunables=scheme), x2, a, b, bias) < RTOL[torch.float32]
    assert _rel_err(first, x, a, b, bias) < RTOL[torch.float32]


def test_bound_path_is_never_taken_for_what_it_did_not_check(scheme, monkeypatch):
    """Each thing the signature leaves out falls back to the full path, which decides as before."""
    x, a, b, bias = _operands(4, 40, 33, 7, torch.float32)
    with torch.no_grad():
        fasttrunc.lowrank_linear(x, a, b, bias, tunables=scheme)
    assert _bound_for(x, a, b, bias, scheme) is not None
    taken = []
    real = _lowrank_launch.run_bound
    monkeypatch.setattr(_lowrank_launch, "run_bound", lambda *args: taken.append(1) or real(*args))
    # gradients wanted: the autograd path, gradients reach a
    a_grad = a.clone().requires_grad_()
    y = fasttrunc.lowrank_linear(x, a_grad, b, bias, tunables=scheme)
    y.sum().backward()
    assert a_grad.grad is not None and not taken
    # the environment asks for torch now: the reference, read at this call
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")
    calls = []
    monkeypatch.setattr(lk, "lowrank_linear_reference", lambda *args: calls.append(1) or torch.zeros(4, 33))
    with torch.no_grad():
        fasttrunc.lowrank_linear(x, a, b, bias, tunables=scheme)
    assert calls and not taken
    monkeypatch.setenv("FASTTRUNC_BACKEND", "triton")
    # equal shapes, another dtype or device of one operand: the checks run and refuse it
    with torch.no_grad(), pytest.raises(ValueError, match="share one dtype"):
        fasttrunc.lowrank_linear(x, a.double(), b, bias, tunables=scheme)
    with torch.no_grad(), pytest.raises(ValueError, match="meta device"):
        fasttrunc.lowrank_linear(x.to("meta"), a.to("meta"), b.to("meta"), bias.to("meta"), tunables=scheme)
    with torch.no_grad(), pytest.raises(TypeError, match="b must be a torch.Tensor; got list"):
        fasttrunc.lowrank_linear(x, a, b.tolist(), bias, tunables=scheme)
    # other tunables: planned, then bound on their own; an equal copy finds the same binding
    other = LowrankTunables(min_k_chunk=32, force_scheme=scheme.force_scheme)
    with torch.no_grad():
        fasttrunc.lowrank_linear(x, a, b, bias, tunables=other)
    assert not taken and _bound_for(x, a, b, bias, other).tunables is other
    with torch.no_grad():
        fasttrunc.lowrank_linear(
            x, a, b, bias, tunables=LowrankTunables(min_k_chunk=16, force_scheme=scheme.force_scheme)
        )
    assert taken == [1]


@pytest.mark.parametrize(
    "off,has_bias", [(None, True), (None, False), ("x", True), ("x", False), ("a", False), ("b", False), ("bias", True)]
)
def test_bound_path_calls_runners_directly_only_when_every_operand_is_aligned(scheme, monkeypatch, off, has_bias):
    """The bound launch calls the all-aligned runners only when x, a, b and the bias all sit on 16
    bytes; one operand off it (a view 2 bytes in) takes the steps with its alignment pattern."""
    monkeypatch.setattr(_lowrank_launch, "is_cuda", lambda device: True)
    monkeypatch.setattr(_lowrank_launch, "cuda_device_count", lambda: 1)
    m, k, n, r = 4, 40, 33, 7
    shapes = {"x": (m, k), "a": (r, k), "b": (n, r), "bias": (n,)}
    ops = {}
    for name, shape in shapes.items():
        flat = torch.randn(math.prod(shape) + 1, dtype=torch.float16)  # fp16: [1:] is 2 bytes in
        ops[name] = (flat[1:] if name == off else flat[:-1]).view(shape)
        assert (ops[name].data_ptr() % 16 == 0) is (name != off)
    bias = ops["bias"] if has_bias else None
    key = (m, k, n, r, torch.float16, ops["x"].device, has_bias, k, k, r, scheme)
    prepared = _lowrank_launch.prepare(key)
    bound = _lowrank_launch.BoundLaunch(scheme, prepared, ops["x"], n)
    direct, stepped = [], []
    for i, step in enumerate(prepared.steps):
        step.runners = {_lowrank_launch.ALL_ALIGNED: lambda *args, i=i: direct.append(i)}
    monkeypatch.setattr(_lowrank_launch, "_launch_steps", lambda *args: stepped.append(args[-1]))
    y = _lowrank_launch.run_bound(bound, ops["x"], ops["a"], ops["b"], bias)
    assert y.shape == (m, n)
    if off is None:
        assert direct == list(range(len(prepared.steps))) and not stepped
    else:
        names = ("x", "a", "b", "bias")
        assert not direct and stepped == [tuple(name != off for name in names)]


def test_strided_operands_are_computed_and_not_bound(scheme):
    """A bias, x, a or b that needs a copy is copied on every call (the kernels read unit strides);
    such signatures are not bound. (Hazard: a strided bias was read as if contiguous.)"""
    x, a, b, _ = _operands(6, 40, 30, 7, torch.float32)
    bias = torch.randn(60)[::2].to(DEVICE)
    xt = torch.randn(40, 6, device=DEVICE).T  # last dim strided
    for args in ((x, a, b, bias), (xt, a, b, None), (x, a.T.contiguous().T, b, None)):
        with torch.no_grad():
            for _ in range(2):
                y = fasttrunc.lowrank_linear(*args, tunables=scheme)
                assert _rel_err(y, *args) < RTOL[torch.float32]
        assert _bound_for(*args, scheme) is None


def test_bound_launches_are_bounded_in_number(scheme, monkeypatch):
    monkeypatch.setattr(_lowrank_launch, "BOUND", {})
    monkeypatch.setattr(_lowrank_launch, "BOUND_MAX", 3)
    with torch.no_grad():
        for m in range(1, 6):
            x, a, b, bias = _operands(m, 40, 33, 7, torch.float32)
            fasttrunc.lowrank_linear(x, a, b, bias, tunables=scheme)
            assert len(_lowrank_launch.BOUND) <= 3


def test_kernel_steps_take_three_dimensional_grids():
    """Hazard: a 1-tuple grid made Triton's compiled runner fail on grid[1] (the light path then
    turned itself off for good). A step refuses anything but a 3-tuple."""
    with pytest.raises(ValueError, match=r"grid \(4,\) must have three dimensions"):
        _lowrank_launch.KernelStep(object(), (4,), (), {}, {})
    for force in ("splitk", "tiled"):
        t = LowrankTunables(min_k_chunk=16, force_scheme=force)
        key = (17, 400, 100, 7, torch.float16, DEVICE, True, 400, 400, 7, t)
        prepared = _lowrank_launch.prepare(key)
        assert prepared.steps and all(len(step.grid) == 3 for step in prepared.steps)


def test_high_rank_uses_the_dense_weight(monkeypatch):
    """Where r (in + out) >= in * out the planner says dense and the functional runs F.linear with
    the rank-r weight, kept for inference and recomputed when a factor changes in place."""
    k, n, r = 24, 40, 16  # 16 * 64 = 1024 >= 960
    assert _plan(3, k, n, r, torch.float32, DEFAULT_TUNABLES).scheme == "dense"
    assert _plan(3, k, n, 14, torch.float32, DEFAULT_TUNABLES).scheme != "dense"  # 14 * 64 < 960
    monkeypatch.setattr(_lowrank_launch, "lowrank_linear_triton", lambda *args: pytest.fail("the kernel ran"))
    x, a, b, bias = _operands(3, k, n, r, torch.float32)
    y = fasttrunc.lowrank_linear(x, a, b, bias)
    assert _rel_err(y, x, a, b, bias) < RTOL[torch.float32]
    w = lk.dense_weight(a, b)
    assert lk.dense_weight(a, b) is w  # kept
    with torch.no_grad():
        a.mul_(2.0)
    assert lk.dense_weight(a, b) is not w  # a changed in place: recomputed
    assert _rel_err(fasttrunc.lowrank_linear(x, a, b, bias), x, a, b, bias) < RTOL[torch.float32]
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    refs = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    g = torch.randn(3, n, device=DEVICE)
    grads = torch.autograd.grad(fasttrunc.lowrank_linear(*leaves), leaves, g)
    grads_ref = torch.autograd.grad(lk.lowrank_linear_reference(*refs), refs, g)
    for name, got, want in zip("x a b bias".split(), grads, grads_ref):
        assert (got - want).norm() / want.norm() < 1e-5, name


def test_dense_weights_leave_with_their_factors():
    x, a, b, _ = _operands(2, 24, 40, 16, torch.float32)
    fasttrunc.lowrank_linear(x, a, b)
    key = id(a)
    assert key in lk._DENSE
    del a
    import gc

    gc.collect()
    assert key not in lk._DENSE


def test_large_m_at_wide_ranks_goes_to_torch():
    """Rules: tiled tiles at R_PAD 512 reach no wgmma; large M there runs cuBLAS's two GEMMs."""
    t = RULES
    assert plan_lowrank(4096, 2048, 8192, 512, torch.bfloat16, 132, t).scheme == "torch"
    assert plan_lowrank(4096, 2048, 8192, 256, torch.bfloat16, 132, t).scheme == "tiled"
    assert plan_lowrank(16, 2048, 8192, 512, torch.bfloat16, 132, t).scheme == "splitk"
    wide = LowrankTunables(max_tiled_rank=512, cost_model=None)
    assert plan_lowrank(4096, 2048, 8192, 512, torch.bfloat16, 132, wide).scheme == "tiled"


def test_ranks_past_the_fused_limit_run_two_torch_gemms():
    t = LowrankTunables(max_fused_rank=8)
    assert _plan(3, 200, 300, 9, torch.float16, t).scheme == "torch"
    x, a, b, bias = _operands(3, 200, 300, 9, torch.float16)
    assert _rel_err(fasttrunc.lowrank_linear(x, a, b, bias, tunables=t), x, a, b, bias) < RTOL[torch.float16]


@pytest.mark.parametrize("bias", [True, False])
def test_empty_batch(scheme, bias):
    x, a, b, bb = _operands(0, 33, 5, 7, torch.float32, bias=bias, lead=(2,))
    y = fasttrunc.lowrank_linear(x, a, b, bb, tunables=scheme)
    assert y.shape == (2, 0, 5)


@pytest.mark.parametrize("bias", [True, False])
def test_rank_zero_is_bias_broadcast(bias):
    x, a, b, bb = _operands(3, 33, 5, 0, torch.float32, bias=bias, lead=(2,))
    y = fasttrunc.lowrank_linear(x, a, b, bb)
    expected = bb.expand(2, 3, 5) if bias else torch.zeros(2, 3, 5, device=DEVICE)
    assert y.shape == (2, 3, 5) and torch.equal(y, expected)
    if bias:  # a fresh tensor, not a view of the user's bias
        y.add_(1)
        assert not torch.equal(y, expected)


def test_three_d_and_strided_inputs(scheme):
    _, a, b, bias = _operands(1, 33, 100, 7, torch.float32)
    cases = {
        "3-D": torch.randn(2, 5, 33, device=DEVICE),
        "row stride": torch.randn(10, 66, device=DEVICE)[:, :33],  # kernel takes the row stride
        "every other row": torch.randn(20, 33, device=DEVICE)[::2],
        "transposed batch": torch.randn(5, 2, 33, device=DEVICE).transpose(0, 1),
        "strided features": torch.randn(2, 3, 66, device=DEVICE)[..., ::2],
    }
    for name, x in cases.items():
        y = fasttrunc.lowrank_linear(x, a, b, bias, tunables=scheme)
        assert y.shape == (*x.shape[:-1], 100), name
        assert _rel_err(y, x, a, b, bias) < RTOL[torch.float32], name


def test_fp16_intermediate_does_not_overflow(scheme):
    """|x @ a.T| ~ 1.3e5 > fp16 max (65504) while y ~ 1e3 fits: the result must be finite and right."""
    k, r, n = 64, 4, 9
    x = torch.full((3, k), 100.0, device=DEVICE).half()
    a = torch.full((r, k), 20.0, device=DEVICE).half()
    b = (torch.rand(n, r, device=DEVICE) * 2e-3).half()
    h_max = (x.float() @ a.float().T).abs().max().item()
    assert h_max > torch.finfo(torch.float16).max
    y = fasttrunc.lowrank_linear(x, a, b, tunables=scheme)
    assert torch.isfinite(y).all()
    assert _rel_err(y, x, a, b, None) < RTOL[torch.float16]


def test_gradients_match_reference_autograd(scheme):
    x, a, b, bias = _operands(5, 33, 17, 7, torch.float32, lead=(2,))
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    refs = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = fasttrunc.lowrank_linear(*leaves, tunables=scheme)
    y_ref = lk.lowrank_linear_reference(*refs)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, refs, g)
    for name, got, want in zip("x a b bias".split(), grads, grads_ref):
        assert (got - want).norm() / want.norm() < 1e-5, name


def test_backward_formula_gradcheck_fp64():
    """The backward formula, in fp64: gradcheck of the reference, then the formula against it."""
    x, a, b, bias = (t.double().requires_grad_() for t in _operands(3, 6, 5, 2, torch.float32))
    assert torch.autograd.gradcheck(lk.lowrank_linear_reference, (x, a, b, bias))
    y = lk.lowrank_linear_reference(x, a, b, bias)
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, (x, a, b, bias), g)
    got = lowrank_backward(g, x.detach(), a.detach(), b.detach(), True, (True, True, True, True))
    for name, u, v in zip("x a b bias".split(), got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12, msg=name)


def test_only_requested_gradients(scheme):
    x, a, b, _ = _operands(3, 33, 5, 7, torch.float32)
    a.requires_grad_()
    y = fasttrunc.lowrank_linear(x, a, b, tunables=scheme)
    (grad_a,) = torch.autograd.grad(y.sum(), [a])
    assert grad_a.shape == a.shape and x.grad is None


def test_custom_op_registration():
    x, a, b, bias = _operands(3, 33, 5, 7, torch.float32)
    torch.library.opcheck(_lowrank_autograd.lowrank_op, (x, a, b, bias), test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_forward_and_backward():
    """Graph capture only (aot_eager generates no code): the custom op and its autograd trace."""
    x, a, b, bias = _operands(4, 33, 17, 7, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]

    def f(x, a, b, bias):
        return torch.nn.functional.gelu(fasttrunc.lowrank_linear(x, a, b, bias)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    refs = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    out_ref = torch.nn.functional.gelu(lk.lowrank_linear_reference(*refs)).sum()
    grads_ref = torch.autograd.grad(out_ref, refs)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_truncated_linear_forward_uses_the_kernel(monkeypatch):
    layer = fasttrunc.TruncatedLinear(33, 17, rank=5, device=DEVICE)
    x = torch.randn(2, 3, 33, device=DEVICE)
    calls = []
    original = _lowrank_launch.lowrank_linear_triton
    monkeypatch.setattr(_lowrank_launch, "lowrank_linear_triton", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        y = layer(x)
    assert calls and _rel_err(y, x, layer.a, layer.b, layer.bias) < RTOL[torch.float32]


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    """On a CPU without the interpreter (and no override) the torch reference serves the call."""
    monkeypatch.delenv("FASTTRUNC_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_lowrank_launch, "lowrank_linear_triton", lambda *args: pytest.fail("the kernel ran"))
    x, a, b, bias = _operands(3, 33, 5, 7, torch.float32)
    y = fasttrunc.lowrank_linear(x.cpu(), a.cpu(), b.cpu(), bias.cpu())
    torch.testing.assert_close(y, lk.lowrank_linear_reference(x.cpu(), a.cpu(), b.cpu(), bias.cpu()))


def test_fp64_runs_the_reference():
    x, a, b, bias = (t.double() for t in _operands(3, 33, 5, 7, torch.float32))
    torch.testing.assert_close(fasttrunc.lowrank_linear(x, a, b, bias), lk.lowrank_linear_reference(x, a, b, bias))


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("in mismatch", r"x has 32 features .* a expects 33"),
        ("rank mismatch", r"b must be \(5, 7\)"),
        ("bias shape", r"bias must have shape \(5,\)"),
        ("dtype mismatch", r"must share one dtype"),
        ("int dtype", r"dtype torch.int64; allowed"),
        ("device mismatch", r"must be on one device"),
    ],
)
def test_bad_input_is_a_clear_error(case, pattern):
    x, a, b, bias = _operands(3, 33, 5, 7, torch.float32)
    args = {
        "in mismatch": (x[:, :32], a, b, bias),
        "rank mismatch": (x, a, b[:, :6], bias),
        "bias shape": (x, a, b, bias[:4]),
        "dtype mismatch": (x.half(), a, b, bias),
        "int dtype": (x.long(), a.long(), b.long(), bias.long()),
        "device mismatch": (x, a.to("meta"), b, bias),
    }[case]
    with pytest.raises(ValueError, match=pattern):
        fasttrunc.lowrank_linear(*args)


def test_triton_launcher_rejects_fp64():
    x, a, b, bias = (t.double() for t in _operands(3, 33, 5, 7, torch.float32))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16; got torch.float64"):
        _lowrank_launch.lowrank_linear_triton(x, a, b, bias)


def test_fast_launcher_reuses_binaries_only_for_matching_keys():
    """The light launch path's bookkeeping, with stand-ins for a Triton kernel and its binary
    (tests/test_aot_launch.py drives it with a real compiled kernel)."""
    log = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: log.append(("fast", grid, args))

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                log.append(("jit", grid, args, kwargs))
                return Compiled()

            return launch

    step = _lowrank_launch.KernelStep(Kernel(), (2, 1, 1), (5, 7), {"BLOCK": 16}, {"num_warps": 4})
    t = torch.zeros(64)
    step((t,), (True,))
    assert log[-1] == ("jit", (2, 1, 1), (t, 5, 7), {"BLOCK": 16, "num_warps": 4})
    step((t,), (True,))
    assert log[-1] == ("fast", (2, 1, 1), (t, 5, 7, 16))  # runtime arguments, then the constexpr values
    step((t[1:],), (False,))  # a pointer off 16-byte alignment: another binary
    assert log[-1][0] == "jit"
    step((t[4:],), (True,))  # aligned again: the first binary
    assert log[-1][0] == "fast"
    step((t,), None)  # off CUDA (the interpreter): always the ordinary launch
    assert log[-1][0] == "jit"

    def broken(*args):
        raise TypeError("another launch API")

    step.runners = {key: broken for key in step.runners}
    step((t,), (True,))
    assert log[-1][0] == "jit" and not step.fast
    step((t,), (True,))
    assert log[-1][0] == "jit"


# ------------------------------------------------------------------ CUDA only -----------------

native_only = pytest.mark.skipif(not NATIVE, reason="compiled kernels: run with FASTTRUNC_TEST_NATIVE=1")


@pytest.mark.gpu
@native_only
@pytest.mark.parametrize("k,n", [(2048, 8192), (8192, 2048), (5120, 20480)])
@pytest.mark.parametrize("r", [32, 128, 512, 1024])
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_pythia_shapes_bf16(k, n, r, m):
    """The benchmark grid, bf16: with the shipped tunables (mostly cuBLAS by the cost model), and by
    the rules, which put the fused kernels on every cell up to R_PAD 256 and every decode cell."""
    x, a, b, bias = (t.cuda() for t in _operands(m, k, n, r, torch.bfloat16))
    assert _rel_err(fasttrunc.lowrank_linear(x, a, b, bias), x, a, b, bias) < RTOL[torch.bfloat16]
    assert _rel_err(fasttrunc.lowrank_linear(x, a, b, bias, tunables=RULES), x, a, b, bias) < RTOL[torch.bfloat16]


@pytest.mark.gpu
@native_only
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_cuda_graph_replay(m):
    """Captured once, replayed on new inputs: correct every time (the workspace is the graph's own)."""
    x, a, b, bias = (t.cuda() for t in _operands(m, 2048, 8192, 128, torch.bfloat16))
    # The rules: split-K up to M = 256, tiled at 4096 (the cost model would pick cuBLAS for some).
    fasttrunc.lowrank_linear(x, a, b, bias, tunables=RULES)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fasttrunc.lowrank_linear(x, a, b, bias, tunables=RULES)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(y, x, a, b, bias) < RTOL[torch.bfloat16]


@pytest.mark.gpu
@native_only
def test_splitk_on_two_streams_at_once():
    """Two split-K launches in flight on two streams (and eager work beside a graph replay) stay correct."""
    x, a, b, bias = (t.cuda() for t in _operands(16, 8192, 2048, 128, torch.bfloat16))
    x2 = torch.randn_like(x)
    t = LowrankTunables(force_scheme="splitk")
    fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for _ in range(5):
        with torch.cuda.stream(s1):
            graph.replay()
        with torch.cuda.stream(s2):
            y2 = fasttrunc.lowrank_linear(x2, a, b, bias, tunables=t)
        torch.cuda.synchronize()
        assert _rel_err(yg, x, a, b, bias) < RTOL[torch.bfloat16]
        assert _rel_err(y2, x2, a, b, bias) < RTOL[torch.bfloat16]


@pytest.mark.gpu
@native_only
@pytest.mark.parametrize("m", [16, 4096])
def test_fast_launch_path_matches_first_launch(m):
    x, a, b, bias = (t.cuda() for t in _operands(m, 2048, 8192, 128, torch.bfloat16))
    first = fasttrunc.lowrank_linear(x, a, b, bias, tunables=RULES)
    for _ in range(3):
        assert torch.equal(fasttrunc.lowrank_linear(x, a, b, bias, tunables=RULES), first)
    key = (m, 2048, 8192, 128, torch.bfloat16, x.device, True, 2048, 2048, 128, RULES)
    steps = _lowrank_launch._PREPARED[key].steps
    assert steps and all(step.fast and step.runners for step in steps), "the light launch path turned itself off"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_scheme_calls_are_bound_too(dtype, monkeypatch):
    """A signature the planner gives to torch's two GEMMs binds as the kernels' do: a repeated call
    skips the checks and the plan lookup, and gives the same bits as the first."""
    t = LowrankTunables(force_scheme="torch")
    x, a, b, bias = _operands(5, 40, 33, 7, dtype, lead=(2,))
    with torch.no_grad():
        first = fasttrunc.lowrank_linear(x, a, b, bias, tunables=t)
        bound = _bound_for(x, a, b, bias, t)
        assert bound is not None and bound.steps == ()
        checked = []
        monkeypatch.setattr(lk, "check_lowrank_inputs", lambda *args: checked.append(1))
        assert torch.equal(fasttrunc.lowrank_linear(x, a, b, bias, tunables=t), first) and not checked
        # bf16 keeps torch's bf16 intermediate; fp32 is the fp32 reference.
        if dtype == torch.bfloat16:
            expected = (x @ a.T) @ b.T + bias
        else:
            expected = lk.lowrank_linear_reference(x, a, b, bias)
        assert torch.equal(first, expected)
