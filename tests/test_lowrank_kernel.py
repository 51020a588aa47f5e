"""The fused low-rank linear kernel against its torch reference.

On a CPU these run Triton's interpreter (conftest sets TRITON_INTERPRET=1); with
FASTTRUNC_TEST_NATIVE=1 on a CUDA machine the same tests run the compiled kernels on the GPU, and
the `gpu` tests (bf16, CUDA graphs, Pythia-sized shapes) run too.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import fasttrunc
from fasttrunc.kernels import lowrank as lk

NATIVE = os.environ.get("FASTTRUNC_TEST_NATIVE", "0") == "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda") if NATIVE else torch.device("cpu")
# Relative Frobenius error bounds against the fp64 reference. fp32 runs true-fp32 dots (a few
# ulps of accumulated rounding); fp16 / bf16 are dominated by rounding the inputs' products and
# the output to 10 / 7 mantissa bits.
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if NATIVE else [])

pytestmark = pytest.mark.skipif(
    not NATIVE and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)


@pytest.fixture(autouse=True)
def _triton_small_tiles(monkeypatch):
    """Force the Triton path and shrink the split-K chunk so tiny shapes use several splits."""
    monkeypatch.setenv("FASTTRUNC_BACKEND", "triton")
    monkeypatch.setattr(lk, "MIN_K_CHUNK", 16)


@pytest.fixture(params=["splitk", "tiled"])
def scheme(request, monkeypatch):
    """Route every M to one kernel."""
    monkeypatch.setattr(lk, "FORCE_SCHEME", request.param)
    return request.param


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
    assert lk.plan_lowrank(m, k, n, r, dtype, DEVICE).scheme == scheme
    y = fasttrunc.lowrank_linear(x, a, b, bias)
    assert _rel_err(y, x, a, b, bias) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_rank_and_many_rows(scheme, dtype):
    """r = 300 pads to 512 (narrow tiles, h tile capped at 32 rows): M = 300 spans many M tiles."""
    x, a, b, bias = _operands(300, 70, 45, 300, dtype)
    cfg = lk.plan_lowrank(300, 70, 45, 300, dtype, DEVICE)
    assert cfg.scheme == scheme and -(-300 // cfg.block_m) > 1
    assert _rel_err(fasttrunc.lowrank_linear(x, a, b, bias), x, a, b, bias) < RTOL[dtype]


def test_default_threshold_routes_by_rows():
    assert lk.plan_lowrank(lk.DECODE_MAX_M, 64, 64, 8, torch.float16, DEVICE).scheme == "splitk"
    assert lk.plan_lowrank(lk.DECODE_MAX_M + 1, 64, 64, 8, torch.float16, DEVICE).scheme == "tiled"


@pytest.mark.parametrize("prefetch", [True, False])
def test_splitk_grid_is_reusable_and_deterministic(monkeypatch, prefetch):
    """The kernel resets its counters: repeated calls (different shapes too) agree bit for bit.

    With one program per SM, phase 2 has fewer programs than out tiles and loops over them
    instead of prefetching its single b tile.
    """
    monkeypatch.setattr(lk, "FORCE_SCHEME", "splitk")
    n = 100 if prefetch else 200
    if not prefetch:  # 2 programs per phase: 2 column groups for 4 out tiles of 64
        monkeypatch.setattr(lk, "PROGRAMS_PER_SM", 1)
        monkeypatch.setattr(lk, "INTERPRETER_SMS", 2)
    x, a, b, bias = _operands(17, 400, n, 7, torch.float16)  # prefetching is for 16-bit tiles
    cfg = lk.plan_lowrank(17, 400, n, 7, torch.float16, DEVICE)
    if not NATIVE:  # the SM count of a real GPU decides the grid there
        assert cfg.n_split > 1 and cfg.n_groups > 1 and cfg.prefetch_b == prefetch
    y1 = fasttrunc.lowrank_linear(x, a, b, bias)
    y_other = fasttrunc.lowrank_linear(x[:3, :], a, b, None)
    y2 = fasttrunc.lowrank_linear(x, a, b, bias)
    assert torch.equal(y1, y2)
    assert _rel_err(y1, x, a, b, bias) < RTOL[torch.float16]
    assert _rel_err(y_other, x[:3], a, b, None) < RTOL[torch.float16]
    _, counters = lk._WORKSPACE.get(DEVICE, 1)
    assert counters.tolist() == [0, 0, 0]


@pytest.mark.parametrize("bias", [True, False])
def test_empty_batch(scheme, bias):
    x, a, b, bb = _operands(0, 33, 5, 7, torch.float32, bias=bias, lead=(2,))
    y = fasttrunc.lowrank_linear(x, a, b, bb)
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
        y = fasttrunc.lowrank_linear(x, a, b, bias)
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
    y = fasttrunc.lowrank_linear(x, a, b)
    assert torch.isfinite(y).all()
    assert _rel_err(y, x, a, b, None) < RTOL[torch.float16]


def test_gradients_match_reference_autograd(scheme):
    x, a, b, bias = _operands(5, 33, 17, 7, torch.float32, lead=(2,))
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    refs = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = fasttrunc.lowrank_linear(*leaves)
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
    got = lk._lowrank_backward(g, x.detach(), a.detach(), b.detach(), True, (True, True, True, True))
    for name, u, v in zip("x a b bias".split(), got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12, msg=name)


def test_only_requested_gradients(scheme):
    x, a, b, _ = _operands(3, 33, 5, 7, torch.float32)
    a.requires_grad_()
    y = fasttrunc.lowrank_linear(x, a, b)
    (grad_a,) = torch.autograd.grad(y.sum(), [a])
    assert grad_a.shape == a.shape and x.grad is None


def test_custom_op_registration():
    x, a, b, bias = _operands(3, 33, 5, 7, torch.float32)
    torch.library.opcheck(lk._lowrank_op, (x, a, b, bias), test_utils=("test_schema", "test_faketensor"))


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
    original = lk.lowrank_linear_triton
    monkeypatch.setattr(lk, "lowrank_linear_triton", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        y = layer(x)
    assert calls and _rel_err(y, x, layer.a, layer.b, layer.bias) < RTOL[torch.float32]


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    """On a CPU without the interpreter (and no override) the torch reference serves the call."""
    monkeypatch.delenv("FASTTRUNC_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(lk, "lowrank_linear_triton", lambda *args: pytest.fail("the kernel ran"))
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
        lk.lowrank_linear_triton(x, a, b, bias)


def test_fast_launcher_reuses_binaries_only_for_matching_keys():
    """The light launch path's bookkeeping, with stand-ins for a Triton kernel and its binary."""
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

    launcher, cuda = lk._FastLauncher(), torch.device("cuda")
    launch = lk._Launch(Kernel(), (2,), (5, 7), {"BLOCK": 16}, {"num_warps": 4}, 0)
    t = torch.zeros(64)
    launcher(launch, (t,), cuda)
    assert log[-1] == ("jit", (2,), (t, 5, 7), {"BLOCK": 16, "num_warps": 4})
    launcher(launch, (t,), cuda)
    assert log[-1] == ("fast", (2,), (t, 5, 7, 16))  # runtime arguments, then the constexpr values
    launcher(launch, (t[1:],), cuda)  # a pointer off 16-byte alignment: another binary
    assert log[-1][0] == "jit"
    launcher(launch, (t[4:],), cuda)  # aligned again: the first binary
    assert log[-1][0] == "fast"

    class Broken(Compiled):
        def __getitem__(self, grid):
            raise TypeError("another launch API")

    launch.compiled = {key: Broken() for key in launch.compiled}
    launcher(launch, (t,), cuda)
    assert log[-1][0] == "jit" and not launcher.enabled
    launcher(launch, (t,), cuda)
    assert log[-1][0] == "jit"


_COMPILE_SCRIPT = r"""
import itertools, json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fasttrunc.kernels import lowrank as lk

tiled, splitk = lk._kernels()
types = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Integer arguments Triton sees as multiples of 16 for the Pythia shapes (it specializes on that).
div16 = {"stride_xm", "stride_ar", "stride_bn", "stride_ym", "K", "N", "K_CHUNK"}
seen, out = set(), []
# sm_90 for every dtype; sm_80 (less shared memory, mma.sync instead of wgmma) for bf16 only.
grid = [case for case in itertools.product(
    (90, 80), list(types), ((2048, 8192), (8192, 2048)), (16, 128, 512, 1024), (1, 16, 256, 4096),
    (None, "splitk", "tiled"),
) if case[0] == 90 or case[1] == torch.bfloat16]
for arch, dtype, (k, n), r, m, force in grid:
    lk.FORCE_SCHEME = force
    cfg = lk._plan(m, k, n, r, dtype, 132 if arch == 90 else 108)
    key = (arch, dtype, cfg.scheme, cfg.block_m, cfg.block_k, cfg.block_n, cfg.r_pad, cfg.num_warps,
           cfg.num_stages, cfg.prefetch_b)
    if key in seen:
        continue
    seen.add(key)
    kernel = tiled if cfg.scheme == "tiled" else splitk
    h_fp32, prec1, prec2 = lk._precisions(dtype)
    const = {"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "BLOCK_N": cfg.block_n, "R_PAD": cfg.r_pad,
             "H_FP32": h_fp32, "PREC1": prec1, "PREC2": prec2, "HAS_BIAS": True, "PREFETCH_B": cfg.prefetch_b}
    const = {name: v for name, v in const.items() if name in kernel.arg_names}
    sig = {}
    for name in kernel.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"ws_ptr": "*fp32", "counters_ptr": "*i32"}.get(name, "*" + types[dtype])
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name.endswith("_ptr") or name in div16}
    try:
        compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        out.append({"case": repr(key), "arch": arch, "shared": compiled.metadata.shared, "error": None})
    except Exception as exc:
        out.append({"case": repr(key), "arch": arch, "shared": None, "error": f"{type(exc).__name__}: {exc}"[-2000:]})
json.dump(out, sys.stdout)
"""


@pytest.mark.slow
@pytest.mark.skipif(NATIVE, reason="the native run compiles every kernel it launches")
def test_every_config_compiles_for_hopper_and_ampere(tmp_path):
    """Ahead-of-time compile (no GPU needed) of every kernel config the planner picks for the
    benchmark shapes, for sm_90 and sm_80, and its shared memory within the SM's limit: the
    interpreter runs the kernels as Python and cannot catch what only the compiler rejects."""
    import json
    import subprocess
    import sys

    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: a stale binary must not hide an error
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert len(results) > 30
    failures = [(r["case"], r["error"]) for r in results if r["error"]]
    assert not failures, failures[:3]
    limit = {90: 227 * 1024, 80: 163 * 1024}  # opt-in shared memory per block
    too_big = [(r["case"], r["shared"]) for r in results if r["shared"] > limit[r["arch"]]]
    assert not too_big, too_big


# ------------------------------------------------------------------ CUDA only -----------------

native_only = pytest.mark.skipif(not NATIVE, reason="compiled kernels: run with FASTTRUNC_TEST_NATIVE=1")


@pytest.mark.gpu
@native_only
@pytest.mark.parametrize("k,n", [(2048, 8192), (8192, 2048), (5120, 20480)])
@pytest.mark.parametrize("r", [32, 128, 512, 1024])
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_pythia_shapes_bf16(monkeypatch, k, n, r, m):
    """The benchmark grid, bf16, with the shipped tunables (not the small-tile test ones)."""
    monkeypatch.setattr(lk, "MIN_K_CHUNK", 128)
    x, a, b, bias = (t.cuda() for t in _operands(m, k, n, r, torch.bfloat16))
    assert _rel_err(fasttrunc.lowrank_linear(x, a, b, bias), x, a, b, bias) < RTOL[torch.bfloat16]


@pytest.mark.gpu
@native_only
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_cuda_graph_replay(monkeypatch, m):
    """Captured once, replayed on new inputs: correct every time (the counters reset themselves)."""
    monkeypatch.setattr(lk, "MIN_K_CHUNK", 128)
    x, a, b, bias = (t.cuda() for t in _operands(m, 2048, 8192, 128, torch.bfloat16))
    fasttrunc.lowrank_linear(x, a, b, bias)  # compile + workspace outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fasttrunc.lowrank_linear(x, a, b, bias)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(y, x, a, b, bias) < RTOL[torch.bfloat16]


@pytest.mark.gpu
@native_only
def test_fast_launch_path_matches_first_launch():
    x, a, b, bias = (t.cuda() for t in _operands(16, 2048, 8192, 128, torch.bfloat16))
    first = fasttrunc.lowrank_linear(x, a, b, bias)
    for _ in range(3):
        assert torch.equal(fasttrunc.lowrank_linear(x, a, b, bias), first)
    assert lk._LAUNCH.enabled, "the light launch path fell back to Triton's ordinary launch"


# ------------------------------------------------------------------ benchmark harness, CLI ----


def test_bench_harness_runs_a_tiny_grid():
    """The benchmark's own code (checks, timing loops, table, summary) on a tiny grid."""
    from fasttrunc.bench import lowrank as bench

    config = bench.LowrankBenchConfig(
        shapes=((33, 20),),
        ranks=(5,),
        ms=(1, 3),
        dtype="float32",
        reps=1,
        calls=2,
        graph_ms=5,
        device=str(DEVICE),
    )
    result = bench.run(config)
    assert [row["m"] for row in result.rows] == [1, 3]
    assert all(row["correct"] and row["rel_err"] < 1e-5 for row in result.rows)
    assert all(row["fused_eager_us"] > 0 and row["two_gemms_eager_us"] > 0 for row in result.rows)
    columns, rows = bench.table_rows(result)
    assert len(rows) == 2 and all(len(r) == len(columns) for r in rows)
    assert result.summary["cells"] == 2 and result.summary["incorrect_cells"] == 0
    assert len(bench.summary_lines(result)) == 5
    assert result.to_dict()["environment"]["torch"] == torch.__version__


@pytest.mark.parametrize(
    "text,pattern",
    [("2048x8192,80", r"shape '80' is not IN x OUT"), ("2048*8192", r"shape '2048\*8192'")],
)
def test_bench_shape_parsing(text, pattern):
    from fasttrunc.bench.lowrank import parse_shapes

    assert parse_shapes(" 2048x8192, 8192X2048") == ((2048, 8192), (8192, 2048))
    with pytest.raises(ValueError, match=pattern):
        parse_shapes(text)


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"ranks": (0,)}, r"rank 0 is outside 1\.\.1024"),
        ({"ranks": (40,), "shapes": ((33, 20),)}, r"rank 40 is outside 1\.\.20 for the shape 33x20"),
        ({"ms": (70000,)}, r"M \(rows\) 70000 is outside 1\.\.65536"),
        ({"dtype": "int8"}, r"dtype 'int8' is not supported"),
    ],
)
def test_bench_config_rejects_bad_values(change, pattern):
    from fasttrunc.bench.lowrank import LowrankBenchConfig

    with pytest.raises(ValueError, match=pattern):
        LowrankBenchConfig(**change).validate()


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
