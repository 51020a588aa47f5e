"""Property-based tests of the public API (issue 10): bad values are refused cleanly, good ones give the reference.

Every generated bad value (None, numpy arrays, strings, bools, floats where ints go, NaN / inf,
negative and huge ints, meta-device and integer tensors, wrong shapes, non-modules, invalid
generators, unknown methods) must raise a ``ValueError`` or ``TypeError`` whose message is one
line and names the argument, and must leave every model, module and tensor it was given as it was
(a hash of names, module types, ``requires_grad`` flags and tensor bytes, before and after). Good
inputs are checked against an independent reference: an explicit float64 SVD, the rank formula of
DESIGN.md section 3, the GPT-NeoX module names written out here.

Counting: with ``FASTTRUNC_FUZZ_TALLY=/some/file`` set, every bad input appends one line
``function, argument, kind, ok | problem`` to that file instead of failing the test at the first
problem, so a run counts how many bad inputs are refused cleanly (the xfail tests then XPASS).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from torch import nn

from fasttrunc import (
    Factors,
    Targets,
    TruncatedLinear,
    factorize,
    lowrank_linear,
    resolve_rank,
    save_truncated,
    truncate_,
    truncated_svd,
)

# 300 examples per test; the autouse seed fixture of conftest.py is function-scoped, which is harmless
# here (nothing in these tests draws from torch's global generator without seeding it first).
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
METHODS = ("exact", "randomized")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True, scope="module")
def _torch_backend_and_scratch_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # The torch path (fast on a CPU; the API checks come before any kernel), one intra-op thread (the
    # matrices are tiny: more threads only add overhead). The working directory is a scratch one, so
    # that a save that wrongly accepts "" cannot write into the checkout.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTTRUNC_BACKEND", "torch")
            patch.chdir(tmp_path_factory.mktemp("fuzz-cwd"))
            yield
    finally:
        torch.set_num_threads(threads)


# --- fingerprints and the one assertion every bad input goes through ---------------------------


def fingerprint(obj: object) -> str:
    """A hash of everything a call could change in ``obj`` (a module, a tensor, or a container of them)."""
    h = hashlib.sha256(type(obj).__qualname__.encode())
    tensors: list[tuple[str, torch.Tensor]] = []
    if isinstance(obj, nn.Module):
        for name, module in obj.named_modules():
            h.update(f"{name}:{type(module).__qualname__}:{module.training};".encode())
        for name, p in obj.named_parameters():
            h.update(f"{name}:{p.requires_grad};".encode())
        tensors = list(obj.state_dict().items())
    elif isinstance(obj, torch.Tensor):
        tensors = [("", obj)]
    elif isinstance(obj, list | tuple):
        return h.hexdigest() + "".join(fingerprint(x) for x in obj)
    elif isinstance(obj, np.ndarray):
        h.update(obj.tobytes())
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.device};".encode())
        if t.device.type != "meta":
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _problem(call: Callable[[], object], names: Sequence[str]) -> str | None:
    try:
        result = call()
    except (ValueError, TypeError) as exc:
        message = str(exc)
        if "\n" in message:
            return f"{type(exc).__name__} message is not one line: {message[:300]!r}"
        if not any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) for name in names):
            return f"{type(exc).__name__} message names none of {list(names)}: {message!r}"
        return None
    except Exception as exc:  # noqa: BLE001 - the point is to see which other errors escape
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"raised {type(exc).__name__}: {first[:200]}"
    restore = getattr(result, "restore", None)
    if callable(restore):
        restore()  # an accepted truncation must not leak into later examples
    return "accepted"


def assert_rejected(
    call: Callable[[], object], names: Sequence[str], watched: Sequence[object], case: tuple[str, str, str]
) -> None:
    """``call()`` raises a one-line ValueError / TypeError naming one of ``names``; ``watched`` unchanged."""
    before = [fingerprint(x) for x in watched]
    problem = _problem(call, names)
    if problem is None and [fingerprint(x) for x in watched] != before:
        problem = "the call was refused but changed an argument (a model, module or tensor)"
    tally = os.environ.get("FASTTRUNC_FUZZ_TALLY")
    if tally:
        with open(tally, "a") as f:
            f.write("\t".join((*case, "ok" if problem is None else problem.replace("\t", " "))) + "\n")
        return
    assert problem is None, f"{case[0]}({case[1]}={case[2]}): {problem}"


# --- bad values ---------------------------------------------------------------------------------

Tagged = tuple[str, Any]


def tag(kind: str, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Tagged]:
    return strategy.map(lambda value: (kind, value))


def fresh(kind: str, make: Callable[[], object]) -> st.SearchStrategy[Tagged]:
    """A value built anew for each example (tensors, modules, objects)."""
    return tag(kind, st.builds(make))


SMALL_ARRAYS = arrays(np.float32, array_shapes(max_dims=2, max_side=4), elements=st.floats(-4, 4, width=32))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def meta_tensor(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def not_a_number(*exclude: str) -> list[st.SearchStrategy[Tagged]]:
    """Values that no numeric parameter accepts (less the kinds in ``exclude``)."""
    parts: dict[str, st.SearchStrategy[Any]] = {
        "None": st.none(),
        "str": st.text(max_size=4),
        "bool": st.booleans(),
        "numpy array": SMALL_ARRAYS,
        "0-d tensor": st.integers(0, 8).map(torch.tensor),
        "meta tensor": st.builds(meta_tensor, st.just(2)),
        "object": st.builds(object),
        "list": st.lists(st.integers(0, 3), min_size=1, max_size=2),
        "complex": st.complex_numbers(max_magnitude=4, allow_nan=False),
    }
    return [tag(kind, strategy) for kind, strategy in parts.items() if kind not in exclude]


def bad_integer(low: int, high: int | None = None, none_ok: bool = False) -> st.SearchStrategy[Tagged]:
    """Anything but an integer in ``[low, high]`` (``high`` None: no upper bound; ``none_ok``: None is legal)."""
    parts = [
        *not_a_number(*(["None"] if none_ok else [])),
        tag("float", st.floats(allow_nan=False, allow_infinity=False)),
        tag("nan/inf", NON_FINITE),
        tag("numpy float", st.floats(-8, 8).map(np.float64)),
        tag("integer below range", st.integers(max_value=low - 1)),
        tag("numpy integer below range", st.integers(-(2**31), low - 1).map(np.int64)),
    ]
    if high is not None:
        parts.append(tag("integer above range", st.integers(min_value=high + 1)))
    return st.one_of(parts)


def bad_rank(max_rank: int, *exclude: str) -> st.SearchStrategy[Tagged]:
    """Anything but an int in ``[0, max_rank]`` or a float in ``[0, 1]`` (less the kinds in ``exclude``)."""
    return st.one_of(
        *not_a_number(*exclude),
        tag("nan/inf", NON_FINITE),
        tag("float outside [0, 1]", st.floats(allow_nan=False).filter(lambda v: not 0.0 <= v <= 1.0)),
        tag("negative integer", st.integers(max_value=-1)),
        tag("integer above the maximum rank", st.integers(min_value=max_rank + 1)),
        tag("numpy integer above the maximum rank", st.integers(max_rank + 1, 2**62).map(np.int64)),
    )


def bad_flag() -> st.SearchStrategy[Tagged]:
    """Anything but True or False."""
    return st.one_of(
        tag("None", st.none()),
        tag("int", st.integers()),
        tag("str", st.text(max_size=4)),
        tag("float", st.floats()),
        tag("numpy bool", st.booleans().map(np.bool_)),
        tag("0-d tensor", st.booleans().map(torch.tensor)),
    )


def bad_method(none_ok: bool = False) -> st.SearchStrategy[Tagged]:
    parts = [
        tag("unknown method", st.text(max_size=10).filter(lambda m: m not in METHODS)),
        tag("method in other case", st.sampled_from(["EXACT", "Randomized", " exact", "exact "])),
        tag("bool", st.booleans()),
        tag("int", st.integers()),
        tag("float", st.floats()),
        tag("numpy array", SMALL_ARRAYS),
        tag("list of a method", st.just(["exact"])),
        tag("bytes", st.just(b"exact")),
    ]
    if not none_ok:
        parts.append(tag("None", st.none()))
    return st.one_of(parts)


def bad_generator() -> st.SearchStrategy[Tagged]:
    return st.one_of(
        tag("int seed", st.integers()),
        tag("str", st.text(max_size=4)),
        tag("bool", st.booleans()),
        tag("numpy Generator", st.integers(0, 9).map(np.random.default_rng)),
        tag("numpy RandomState", st.integers(0, 9).map(np.random.RandomState)),
        fresh("object", object),
        tag("tensor", st.integers(0, 9).map(torch.tensor)),
    )


def bad_dtype(none_ok: bool = True) -> st.SearchStrategy[Tagged]:
    parts = [
        tag("integer dtype", st.sampled_from([torch.int8, torch.int32, torch.int64, torch.uint8])),
        tag("bool dtype", st.just(torch.bool)),
        tag("complex dtype", st.sampled_from([torch.complex64, torch.complex128])),
        tag("dtype name", st.sampled_from(["float32", "torch.float32", "fp16"])),
        tag("numpy dtype", st.sampled_from([np.float32, np.dtype("float64")])),
        tag("python type", st.sampled_from([float, int])),
        tag("int", st.integers()),
    ]
    if not none_ok:
        parts.append(tag("None", st.none()))
    return st.one_of(parts)


def _device_unusable(spec: object) -> bool:
    try:
        torch.empty(0, device=spec)  # type: ignore[call-overload]
    except Exception:  # noqa: BLE001 - any failure makes it a bad device
        return True
    return False


def bad_device() -> st.SearchStrategy[Tagged]:
    absent = [d for d in ("cuda", "cuda:0", "cuda:99", "mps", 0, 7) if _device_unusable(d)]
    return st.one_of(
        tag("unknown device name", st.text(max_size=8).filter(_device_unusable)),
        tag("absent device", st.sampled_from(absent)),
        tag("float", st.floats()),
        tag("bool", st.booleans()),
        tag("numpy array", SMALL_ARRAYS),
        fresh("object", object),
    )


# Where a tensor goes: each bad tensor is built from the good shape it replaces.
def bad_tensor(shape: tuple[int, ...], finite: bool = True) -> st.SearchStrategy[Tagged]:
    """Anything but a finite floating-point CPU tensor of ``shape``."""
    parts = [
        tag("None", st.none()),
        tag("numpy array", st.just(shape).map(lambda s: np.ones(s, dtype=np.float32))),
        tag("nested list", st.just(shape).map(lambda s: np.ones(s).tolist())),
        tag("str", st.text(max_size=4)),
        tag("float", st.floats()),
        fresh("meta tensor", lambda: meta_tensor(*shape)),
        tag(
            "integer tensor",
            st.sampled_from([torch.int32, torch.int64, torch.uint8]).map(lambda d: torch.ones(shape, dtype=d)),
        ),
        fresh("bool tensor", lambda: torch.ones(shape, dtype=torch.bool)),
        fresh("complex tensor", lambda: torch.ones(shape, dtype=torch.complex64)),
        tag(
            "wrong number of dimensions",
            st.sampled_from([0, 1, 2, 3]).filter(lambda d: d != len(shape)).map(lambda d: torch.ones((2,) * d)),
        ),
    ]
    if finite:
        parts.append(
            tag(
                "NaN or inf entry",
                st.tuples(st.integers(0, 10**6), NON_FINITE).map(lambda p: _with_entry(torch.ones(shape), *p)),
            )
        )
    return st.one_of(parts)


def _with_entry(t: torch.Tensor, index: int, value: float) -> torch.Tensor:
    if t.numel():
        t.view(-1)[index % t.numel()] = value
    return t


def weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as the tensor it is (nn.Module's attribute lookup is typed loosely)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def bias_of(module: nn.Module) -> torch.Tensor | None:
    b = module.bias
    assert b is None or isinstance(b, torch.Tensor)
    return b


def svd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``truncated_svd`` on one matrix (its return type is a union of the one- and many-matrix forms)."""
    result = truncated_svd(*args, **kwargs)
    assert isinstance(result, tuple)
    return result


# --- tiny models, built once --------------------------------------------------------------------

NEOX_LAYERS = 2
# What each matrix alias names inside one GPT-NeoX block (written out here, independently of families.py).
NEOX_ALIASES = {
    "mlp_in": ("mlp.dense_h_to_4h",),
    "mlp_out": ("mlp.dense_4h_to_h",),
    "attn_qkv": ("attention.query_key_value",),
    "attn_out": ("attention.dense",),
}
NEOX_GROUPS = {"mlp": ("mlp_in", "mlp_out"), "attn": ("attn_qkv", "attn_out"), "all": tuple(NEOX_ALIASES)}
BASE_TARGETS = Targets(layers=0, matrices="mlp")
BASE_NAMES = ("gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h")
BASE_MAX_RANK = 16  # both are 16 x 24 / 24 x 16


def _neox_config() -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=NEOX_LAYERS,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


@cache
def neox() -> nn.Module:
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(_neox_config()).eval()


@cache
def mixed() -> nn.Sequential:
    """No family row: nn.Linear with and without bias, a frozen one, a Conv1D, a non-linear module."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 6, bias=False), Conv1D(7, 6), nn.Linear(7, 5))
    model[4].requires_grad_(False)
    return model


@cache
def meta_neox() -> nn.Module:
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        return GPTNeoXForCausalLM(_neox_config()).eval()


def _neox_with(change: Callable[[nn.Module], None]) -> nn.Module:
    model = copy.deepcopy(neox())
    change(model.get_submodule(BASE_NAMES[0]))
    return model


def _integer_weight(linear: nn.Module) -> None:
    linear.weight = nn.Parameter(torch.ones(weight(linear).shape, dtype=torch.int64), requires_grad=False)


def _non_finite_weight(value: float) -> Callable[[nn.Module], None]:
    def change(linear: nn.Module) -> None:
        with torch.no_grad():
            weight(linear)[1, 2] = value

    return change


@cache
def broken_neox(kind: str) -> nn.Module:
    if kind == "meta":
        return meta_neox()
    if kind == "integer weight":
        return _neox_with(_integer_weight)
    return _neox_with(_non_finite_weight({"NaN weight": math.nan, "inf weight": math.inf}[kind]))


def bad_model() -> st.SearchStrategy[Tagged]:
    """Anything but a usable nn.Module (for a model whose layer 0 MLP is targeted)."""
    return st.one_of(
        tag("None", st.none()),
        tag("numpy array", SMALL_ARRAYS),
        tag("str", st.text(max_size=6)),
        tag("int", st.integers()),
        tag("module class", st.sampled_from([nn.Linear, nn.Module])),
        fresh("list of modules", lambda: [nn.Linear(2, 2)]),
        fresh("dict of modules", lambda: {"0": nn.Linear(2, 2)}),
        fresh("state dict", lambda: nn.Linear(2, 2).state_dict()),
        st.sampled_from(["meta", "integer weight", "NaN weight", "inf weight"]).map(
            lambda k: (f"model with {k}" if k != "meta" else "model on the meta device", broken_neox(k))
        ),
    )


def _matches_a_linear(pattern: str, model: nn.Module) -> bool:
    try:
        compiled = re.compile(pattern)
    except re.error:
        return False
    return any(compiled.fullmatch(n) for n, m in model.named_modules() if isinstance(m, nn.Linear))


def bad_targets() -> st.SearchStrategy[Tagged]:
    """Target specifications that select nothing truncatable in the tiny GPT-NeoX."""
    model = neox()
    return st.one_of(
        tag("None", st.none()),
        tag("numpy array", SMALL_ARRAYS),
        tag("bool", st.booleans()),
        tag("int", st.integers()),
        tag("float", st.floats()),
        tag("empty list", st.just([])),
        tag("set of regexes", st.just({r".*dense"})),
        tag("list with a non-string", st.lists(st.one_of(st.integers(), st.none()), min_size=1, max_size=2)),
        tag("invalid regex", st.sampled_from(["(", "[a-", "*", "a{2,1}", "(?P<", "\\"])),
        tag(
            "regex matching no linear",
            st.text(alphabet="abdegilmnorstxyz_.0123456789*+?()[]|\\", max_size=12).filter(
                lambda p: not _matches_a_linear(p, model)
            ),
        ),
        tag("callable selecting nothing", st.just(lambda name, module: False)),
        tag("callable selecting no linear", st.just(lambda name, module: isinstance(module, nn.LayerNorm))),
        tag(
            "Targets layer out of range",
            st.one_of(st.integers(min_value=NEOX_LAYERS), st.integers(max_value=-NEOX_LAYERS - 1)).map(
                lambda layer: Targets(layers=layer)
            ),
        ),
        tag("Targets with no layers", st.just(Targets(layers=[]))),
        tag(
            "Targets unknown matrix",
            st.text(max_size=8)
            .filter(lambda m: m not in NEOX_ALIASES and m not in NEOX_GROUPS)
            .map(lambda m: Targets(matrices=m)),
        ),
        tag(
            "Targets part of a fused matrix",
            st.sampled_from(["attn_q", "attn_k", "attn_v"]).map(lambda m: Targets(matrices=m)),
        ),
        tag("Targets alias this family lacks", st.just(Targets(matrices="mlp_up"))),
        tag("Targets with no matrices", st.just(Targets(matrices=[]))),
    )


TARGET_NAMES = ("targets", "layers", "layer", "matrices", "matrix")


@cache
def base_factors(kind: str) -> Factors:
    """Factors that do not fit ``truncate_(neox(), BASE_TARGETS, 2)``."""
    model = neox()
    if kind == "randomized":
        return factorize(model, BASE_TARGETS, BASE_MAX_RANK, method="randomized")
    if kind == "rank 1":
        return factorize(model, BASE_TARGETS, 1)
    if kind == "other modules":
        return factorize(model, Targets(layers=1, matrices="mlp"), 4)
    u, s, vh = torch.zeros(3, 2), torch.zeros(2), torch.zeros(2, 3)  # "other shapes"
    return Factors({name: (u, s, vh) for name in BASE_NAMES}, "exact", 1)


def bad_factors() -> st.SearchStrategy[Tagged]:
    return st.one_of(
        fresh("dict", dict),
        tag("list", st.just([])),
        tag("str", st.text(max_size=4)),
        tag("numpy array", SMALL_ARRAYS),
        st.sampled_from(["randomized", "rank 1", "other modules", "other shapes"]).map(
            lambda k: (f"Factors of {k}", base_factors(k))
        ),
    )


def bad_svd_option() -> st.SearchStrategy[tuple[str, Tagged]]:
    """(option name, (kind, value)) for the SVD options truncate_, factorize and from_linear pass on."""
    return st.one_of(
        st.tuples(st.just("n_iter"), bad_integer(0, 100, none_ok=True)),
        st.tuples(st.just("oversample"), bad_integer(0, none_ok=True)),
        st.tuples(st.just("generator"), bad_generator()),
        st.tuples(st.sampled_from(["niter", "seed", "full_matrices", "q"]), tag("unknown option", st.integers(0, 3))),
    )


# --- bad arguments, one function at a time ------------------------------------------------------


def bad_mapping_rank() -> st.SearchStrategy[Tagged]:
    """Per-module rank mappings that do not fit the modules BASE_TARGETS selects."""
    return st.one_of(
        tag("mapping naming an unselected module", st.just({BASE_NAMES[0]: 2, BASE_NAMES[1]: 2, "embed_out": 2})),
        tag("mapping missing a module", st.just({BASE_NAMES[0]: 2})),
        tag("mapping with non-string keys", st.just({0: 2, 1: 2})),
        bad_rank(BASE_MAX_RANK).map(lambda kv: (f"mapping to {kv[0]}", dict.fromkeys(BASE_NAMES, kv[1]))),
    )


def check_model_call(data: st.DataObject, function: Callable[..., object], rank_name: str, with_factors: bool) -> None:
    """One bad argument of ``function(model, targets, <rank_name>, method, [factors], **svd_options)``."""
    model = neox()
    args: dict[str, Any] = {"model": model, "targets": BASE_TARGETS, rank_name: 2, "method": "exact"}
    bad: dict[str, st.SearchStrategy[Tagged]] = {
        "model": bad_model(),
        "targets": bad_targets(),
        rank_name: st.one_of(bad_rank(BASE_MAX_RANK), bad_mapping_rank()),
        "method": bad_method(),
    }
    if with_factors:
        bad["factors"] = bad_factors()
    argument = data.draw(st.sampled_from([*bad, "svd option"]))
    options: dict[str, Any] = {}
    if argument == "svd option":
        argument, (kind, options[argument]) = data.draw(bad_svd_option())
    else:
        kind, args[argument] = data.draw(bad[argument])
    names = TARGET_NAMES if argument == "targets" else (argument,)
    case = (function.__name__, argument, kind)
    assert_rejected(lambda: function(**args, **options), names, [model, args["model"]], case)


@FUZZ
@given(data=st.data())
def test_truncate_rejects_bad_arguments(data: st.DataObject) -> None:
    check_model_call(data, truncate_, "rank", with_factors=True)


@FUZZ
@given(data=st.data())
def test_factorize_rejects_bad_arguments(data: st.DataObject) -> None:
    check_model_call(data, factorize, "max_rank", with_factors=False)


@FUZZ
@given(data=st.data(), as_list=st.booleans())
def test_truncated_svd_rejects_bad_arguments(data: st.DataObject, as_list: bool) -> None:
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    args: dict[str, Any] = {"w": [w, w.t()] if as_list else w, "rank": 2, "method": "exact"}
    argument = data.draw(st.sampled_from(["w", "rank", "method", "n_iter", "oversample", "generator", "dtype"]))
    if argument == "w":
        kind, value = data.draw(bad_tensor((5, 4)))
        if as_list:
            kind, value = f"list holding a {kind}", [w, value]
        elif isinstance(value, list):  # a list of tensors is legal; a nested list of numbers is not
            value = [value]
        elif kind == "wrong number of dimensions" and value.dim() >= 2:  # a batch (..., m, n) is legal alone
            value = value.reshape(-1)
        args["w"] = value
    elif argument == "rank":
        strategies = [bad_rank(4, "list") if as_list else bad_rank(4)]  # a list of two ranks is legal there
        if as_list:
            strategies.append(
                tag("list of ranks of the wrong length", st.lists(st.integers(0, 4)).filter(lambda r: len(r) != 2))
            )
            strategies.append(bad_rank(4).map(lambda kv: (f"list holding a {kv[0]}", [2, kv[1]])))
        kind, args["rank"] = data.draw(st.one_of(strategies))
    elif argument == "method":
        kind, args["method"] = data.draw(bad_method())
    elif argument == "n_iter":
        kind, args["n_iter"] = data.draw(bad_integer(0, 100, none_ok=True))
    elif argument == "oversample":
        kind, args["oversample"] = data.draw(bad_integer(0, none_ok=True))
    elif argument == "generator":
        kind, args["generator"] = data.draw(bad_generator())
    else:
        kind, args["dtype"] = data.draw(bad_dtype())
    assert_rejected(lambda: truncated_svd(**args), (argument,), [w, args["w"]], ("truncated_svd", argument, kind))


@FUZZ
@given(data=st.data())
def test_truncated_linear_constructor_rejects_bad_arguments(data: st.DataObject) -> None:
    args: dict[str, Any] = {"in_features": 6, "out_features": 4, "rank": 2, "bias": True, "device": None, "dtype": None}
    argument = data.draw(st.sampled_from(sorted(args)))
    if argument in ("in_features", "out_features"):
        # Rank 0 and no bias: a size that slips through allocates nothing (2**31 x 2 fp32 would be 16 GB).
        args["rank"], args["bias"] = 0, False
    strategy = {
        "in_features": bad_integer(1, 2**31 - 1),
        "out_features": bad_integer(1, 2**31 - 1),
        "rank": bad_rank(4),
        "bias": bad_flag(),
        "device": bad_device(),
        "dtype": bad_dtype(),
    }[argument]
    kind, args[argument] = data.draw(strategy)
    assert_rejected(lambda: TruncatedLinear(**args), (argument,), [], ("TruncatedLinear", argument, kind))


@cache
def bad_linear(kind: str) -> nn.Module:
    if kind == "meta":
        return nn.Linear(4, 3, device="meta")
    linear = copy.deepcopy(neox().get_submodule(BASE_NAMES[0]))
    if kind == "integer weight":
        _integer_weight(linear)
    else:
        _non_finite_weight({"NaN weight": math.nan, "inf weight": math.inf}[kind])(linear)
    return linear


@FUZZ
@given(data=st.data())
def test_from_linear_rejects_bad_arguments(data: st.DataObject) -> None:
    source = neox().get_submodule(BASE_NAMES[0])
    args: dict[str, Any] = {"linear": source, "rank": 2, "method": "exact"}
    options: dict[str, Any] = {}
    argument = data.draw(st.sampled_from(["linear", "rank", "method", "svd option"]))
    if argument == "linear":
        kind, args["linear"] = data.draw(
            st.one_of(
                tag("None", st.none()),
                tag("numpy array", SMALL_ARRAYS),
                tag("str", st.text(max_size=4)),
                tag("weight tensor", st.just(source.weight)),
                tag("module class", st.just(nn.Linear)),
                st.sampled_from([nn.ReLU(), nn.Conv2d(1, 1, 1), nn.Embedding(3, 2), nn.LayerNorm(4)]).map(
                    lambda m: ("module of another kind", m)
                ),
                st.sampled_from(["meta", "integer weight", "NaN weight", "inf weight"]).map(
                    lambda k: (f"linear with {k}", bad_linear(k))
                ),
            )
        )
    elif argument == "rank":
        kind, args["rank"] = data.draw(bad_rank(BASE_MAX_RANK))
    elif argument == "method":
        kind, args["method"] = data.draw(bad_method())
    else:
        argument, (kind, options[argument]) = data.draw(bad_svd_option())
    watched = [source, args["linear"]]
    assert_rejected(
        lambda: TruncatedLinear.from_linear(**args, **options),
        (argument,),
        watched,
        ("TruncatedLinear.from_linear", argument, kind),
    )


@FUZZ
@given(data=st.data(), with_bias=st.booleans())
def test_from_svd_rejects_bad_arguments(data: st.DataObject, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    args: dict[str, Any] = {
        "u": torch.randn(5, 2, generator=g),
        "s": torch.rand(2, generator=g),
        "vh": torch.randn(2, 4, generator=g),
        "bias": torch.randn(5, generator=g) if with_bias else None,
        "method": "exact",
        "dtype": None,
        "requires_grad": True,
    }
    argument = data.draw(st.sampled_from(sorted(args)))
    good_shapes = {"u": (5, 2), "s": (2,), "vh": (2, 4), "bias": (5,)}
    names: Sequence[str] = (argument,)
    if argument in ("u", "s", "vh"):
        shape = good_shapes[argument]
        wrong = tuple(d + 1 for d in shape)
        kind, args[argument] = data.draw(
            st.one_of(
                bad_tensor(shape),
                tag("mismatched shape", st.just(wrong).map(torch.ones)),
                tag("empty dimension", st.just(shape).map(lambda s: torch.ones(0, *s[1:]))),
            )
        )
    elif argument == "bias":
        kind, args["bias"] = data.draw(
            st.one_of(
                bad_tensor((5,), finite=False).filter(lambda kv: kv[1] is not None),
                tag("wrong length", st.sampled_from([0, 4, 6]).map(torch.ones)),
            )
        )
    elif argument == "method":
        kind, args["method"] = data.draw(bad_method(none_ok=True))
    elif argument == "dtype":
        kind, args["dtype"] = data.draw(bad_dtype())
    else:
        kind, args["requires_grad"] = data.draw(bad_flag())
    if argument == "s" and data.draw(st.booleans()):
        kind, args["s"] = "negative singular value", torch.tensor([0.5, -data.draw(st.floats(1e-6, 10))])
    if argument in ("u", "vh") and data.draw(st.booleans()):
        # A rank above min(out, in): u (3, 5), s (5,), vh (5, 4), named by the factors that carry it.
        kind, names = "rank above min(out, in)", ("u", "vh", "s")
        args["u"], args["s"], args["vh"] = torch.ones(3, 5), torch.ones(5), torch.ones(5, 4)
    if kind == "mismatched shape":
        names = ("u", "s", "vh")
    watched = [args[k] for k in ("u", "s", "vh", "bias")]
    assert_rejected(
        lambda: TruncatedLinear.from_svd(**args), names, watched, ("TruncatedLinear.from_svd", argument, kind)
    )


@FUZZ
@given(data=st.data())
def test_resolve_rank_rejects_bad_arguments(data: st.DataObject) -> None:
    args: dict[str, Any] = {"rank": 2, "out_features": 6, "in_features": 4}
    argument = data.draw(st.sampled_from(sorted(args)))
    kind, args[argument] = data.draw(bad_rank(4) if argument == "rank" else bad_integer(0))
    assert_rejected(lambda: resolve_rank(**args), (argument,), [], ("resolve_rank", argument, kind))


@FUZZ
@given(data=st.data())
def test_targets_rejects_bad_arguments(data: st.DataObject) -> None:
    argument = data.draw(st.sampled_from(["layers", "matrices"]))
    not_layers = st.one_of(*not_a_number("None", "list"), tag("float", st.floats()), tag("nan/inf", NON_FINITE))
    if argument == "layers":
        kind, value = data.draw(
            st.one_of(
                not_layers,
                not_layers.map(lambda kv: (f"list holding a {kv[0]}", [0, kv[1]])),
                tag("set", st.just({0, 1})),
                tag("dict", st.just({0: 1})),
            )
        )
    else:
        kind, value = data.draw(
            st.one_of(
                tag("None", st.none()),
                tag("int", st.integers()),
                tag("bool", st.booleans()),
                tag("numpy array of names", st.just(np.array(["mlp_in"]))),
                tag("set of names", st.just({"mlp_in"})),
                tag("list holding a non-string", st.lists(st.one_of(st.integers(), st.none()), min_size=1)),
                fresh("object", object),
            )
        )
    assert_rejected(lambda: Targets(**{argument: value}), (argument,), [], ("Targets", argument, kind))


@FUZZ
@given(data=st.data())
def test_save_truncated_rejects_a_bad_model(data: st.DataObject, tmp_path: Path) -> None:
    kind, model = data.draw(
        bad_model().filter(
            lambda kv: (
                kv[0]
                in (
                    "None",
                    "numpy array",
                    "str",
                    "int",
                    "module class",
                    "list of modules",
                    "dict of modules",
                    "model on the meta device",
                )
            )
        )
    )
    target = tmp_path / f"save-{data.draw(st.integers(0, 10**9))}"
    assert_rejected(lambda: save_truncated(model, target), ("model",), [model], ("save_truncated", "model", kind))
    assert not target.exists(), "a refused save created its directory"


@FUZZ
@given(data=st.data())
def test_save_truncated_rejects_a_bad_directory(data: st.DataObject) -> None:
    model = mixed()
    kind, directory = data.draw(
        st.one_of(
            tag("None", st.none()),
            tag("int", st.integers()),
            tag("float", st.floats()),
            tag("bool", st.booleans()),
            tag("numpy array", SMALL_ARRAYS),
            fresh("object", object),
            tag("empty path", st.just("")),
        )
    )
    assert_rejected(
        lambda: save_truncated(model, directory), ("directory",), [model], ("save_truncated", "directory", kind)
    )


LOWRANK_SHAPES = {"x": (3, 4), "a": (2, 4), "b": (5, 2), "bias": (5,)}


def _lowrank_operands(with_bias: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    operands: dict[str, Any] = {name: torch.randn(shape, generator=g) for name, shape in LOWRANK_SHAPES.items()}
    if not with_bias:
        operands["bias"] = None
    return operands


@FUZZ
@given(data=st.data(), with_bias=st.booleans())
def test_lowrank_linear_rejects_bad_tensors(data: st.DataObject, with_bias: bool) -> None:
    """Wrong shapes, dtypes and devices among real tensors: checked by kernels/lowrank.py today."""
    args = _lowrank_operands(with_bias)
    argument = data.draw(st.sampled_from(["x", "a", "b", "bias"]))
    shape = LOWRANK_SHAPES[argument]
    kind, args[argument] = data.draw(
        st.one_of(
            tag(
                "integer tensor",
                st.sampled_from([torch.int32, torch.int64]).map(lambda d: torch.ones(shape, dtype=d)),
            ),
            fresh("bool tensor", lambda: torch.ones(shape, dtype=torch.bool)),
            fresh("float64 among float32", lambda: torch.ones(shape, dtype=torch.float64)),
            fresh("on the meta device among CPU tensors", lambda: meta_tensor(*shape)),
            tag(
                "wrong shape",
                st.lists(st.integers(1, 6), min_size=1, max_size=3)
                .map(tuple)
                .filter(lambda s: not _fits(argument, s, with_bias))
                .map(torch.ones),
            ),
        )
    )
    watched = [t for t in args.values() if isinstance(t, torch.Tensor)]
    names = ("b", "bias") if argument == "b" else (argument,)  # b's out features are checked against the bias
    assert_rejected(lambda: lowrank_linear(**args), names, watched, ("lowrank_linear", argument, kind))


def _fits(argument: str, shape: tuple[int, ...], with_bias: bool) -> bool:
    """Whether ``shape`` is a legal shape for ``argument`` beside the other operands of LOWRANK_SHAPES."""
    if argument == "x":
        return shape[-1] == 4
    if argument == "b":
        return len(shape) == 2 and shape[1] == 2 and (not with_bias or shape[0] == 5)
    return shape == LOWRANK_SHAPES[argument]


@FUZZ
@given(data=st.data(), with_bias=st.booleans())
def test_lowrank_linear_rejects_non_tensors(data: st.DataObject, with_bias: bool) -> None:
    args = _lowrank_operands(with_bias)
    argument = data.draw(st.sampled_from(["x", "a", "b", "bias"]))
    shape = LOWRANK_SHAPES[argument]
    strategies = [
        tag("numpy array", st.just(shape).map(lambda s: np.ones(s, dtype=np.float32))),
        tag("nested list", st.just(shape).map(lambda s: np.ones(s).tolist())),
        tag("str", st.text(max_size=4)),
        tag("float", st.floats()),
    ]
    if argument != "bias":
        strategies.append(tag("None", st.none()))
    kind, args[argument] = data.draw(st.one_of(strategies))
    assert_rejected(lambda: lowrank_linear(**args), (argument,), [], ("lowrank_linear", argument, kind))


@FUZZ
@given(with_bias=st.booleans(), batch=st.lists(st.integers(1, 3), max_size=2))
def test_lowrank_linear_rejects_meta_tensors(with_bias: bool, batch: list[int]) -> None:
    args: dict[str, torch.Tensor | None] = {name: meta_tensor(*shape) for name, shape in LOWRANK_SHAPES.items()}
    args["x"] = meta_tensor(*batch, 4)
    if not with_bias:
        args["bias"] = None
    assert_rejected(lambda: lowrank_linear(**args), ("x", "a", "b"), [], ("lowrank_linear", "x", "meta tensors"))


# --- good inputs give the reference answer ------------------------------------------------------


def _weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight, read here without fasttrunc: Conv1D stores (in, out)."""
    w = weight(module).detach()
    return w if isinstance(module, nn.Linear) else w.t()


@cache
def _reference_svd(model_name: str, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = {"neox": neox, "mixed": mixed}[model_name]()
    u, s, vh = torch.linalg.svd(_weight(model.get_submodule(name)).double(), full_matrices=False)
    return u, s, vh


@cache
def _best_approximation(model_name: str, name: str, k: int) -> torch.Tensor:
    u, s, vh = _reference_svd(model_name, name)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _linear_names(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]


@st.composite
def targets_and_names(draw: st.DrawFn, model_name: str) -> tuple[Any, list[str]]:
    """A target specification and the module names it must select (derived here, not by fasttrunc)."""
    model = {"neox": neox, "mixed": mixed}[model_name]()
    linears = _linear_names(model)
    forms = ["regexes", "callable"] + (["Targets"] if model_name == "neox" else [])
    form = draw(st.sampled_from(forms))
    if form == "Targets":
        layers = draw(
            st.one_of(
                st.none(),
                st.integers(-NEOX_LAYERS, NEOX_LAYERS - 1),
                st.lists(st.integers(-NEOX_LAYERS, NEOX_LAYERS - 1), min_size=1, max_size=3),
                st.integers(-NEOX_LAYERS, NEOX_LAYERS - 1).map(np.int64),
            )
        )
        aliases = list(NEOX_ALIASES) + list(NEOX_GROUPS)
        matrices = draw(st.one_of(st.sampled_from(aliases), st.lists(st.sampled_from(aliases), min_size=1, max_size=3)))
        indices = range(NEOX_LAYERS) if layers is None else [int(i) % NEOX_LAYERS for i in np.atleast_1d(layers)]
        singles = [a for m in ([matrices] if isinstance(matrices, str) else matrices) for a in NEOX_GROUPS.get(m, (m,))]
        names = [f"gpt_neox.layers.{i}.{rel}" for i in indices for a in singles for rel in NEOX_ALIASES[a]]
        return Targets(layers=layers, matrices=matrices), list(dict.fromkeys(names))  # type: ignore[arg-type]
    chosen = draw(st.lists(st.sampled_from(linears), min_size=1, max_size=4, unique=True))
    if form == "regexes":
        return [re.escape(n) for n in chosen], chosen
    wanted = set(chosen)
    return (lambda name, module: name in wanted), chosen


@FUZZ
@given(data=st.data(), model_name=st.sampled_from(["neox", "mixed"]), method=st.sampled_from(METHODS))
def test_truncate_equals_the_explicit_svd_reconstruction(data: st.DataObject, model_name: str, method: str) -> None:
    # On these tiny shapes the randomized method falls back to the exact SVD (k + oversample >= min(m, n)).
    model = {"neox": neox, "mixed": mixed}[model_name]()
    targets, names = data.draw(targets_and_names(model_name))
    originals = {n: model.get_submodule(n) for n in names}
    max_ranks = {n: min(_weight(m).shape) for n, m in originals.items()}
    form = data.draw(st.sampled_from(["int", "float", "mapping"]))
    rank: Any
    if form == "int":
        rank = data.draw(st.integers(0, min(max_ranks.values())))
        ks = dict.fromkeys(names, rank)
    elif form == "float":
        rank = data.draw(st.floats(0, 1))
        ks = {n: int(rank * max_ranks[n]) for n in names}  # DESIGN.md section 3
    else:
        rank = {n: data.draw(st.integers(0, max_ranks[n])) for n in names}
        ks = dict(rank)
    references = {n: _best_approximation(model_name, n, ks[n]) for n in names}  # before the swap
    factors = None
    if data.draw(st.booleans(), label="through factorize"):
        factors = factorize(model, targets, {n: data.draw(st.integers(ks[n], max_ranks[n])) for n in names}, method)
    before = fingerprint(model)
    truncation = truncate_(model, targets, rank, method=method, factors=factors)
    try:
        assert sorted(truncation) == sorted(names)
        for name, original in originals.items():
            module = model.get_submodule(name)
            assert module is truncation[name] and isinstance(module, TruncatedLinear)
            assert module.rank == ks[name] and module.method == method
            assert module.a.dtype == original.weight.dtype
            assert all(p.requires_grad == original.weight.requires_grad for p in module.parameters())
            reference = references[name]
            scale = max(1.0, _reference_svd(model_name, name)[1][0].item())
            torch.testing.assert_close(module.weight.double(), reference, rtol=0, atol=2e-6 * scale)
            if original.bias is None:
                assert module.bias is None
            else:
                assert torch.equal(bias_of(module), bias_of(original))  # type: ignore[arg-type]
    finally:
        truncation.restore()
    assert fingerprint(model) == before
    assert all(model.get_submodule(n) is m for n, m in originals.items())


@FUZZ
@given(data=st.data(), method=st.sampled_from(METHODS))
def test_factorize_gives_the_leading_singular_triplets(data: st.DataObject, method: str) -> None:
    model = neox()
    targets, names = data.draw(targets_and_names("neox"))
    max_rank = data.draw(st.integers(0, 16))
    before = fingerprint(model)
    factors = factorize(model, targets, max_rank, method=method)
    assert fingerprint(model) == before and sorted(factors) == sorted(names)
    assert factors.max_ranks == dict.fromkeys(names, max_rank)
    for name in names:
        u, s, vh = factors[name]
        _, s_ref, _ = _reference_svd("neox", name)
        torch.testing.assert_close(s.double(), s_ref[:max_rank], rtol=0, atol=1e-5 * s_ref[0].item())
        torch.testing.assert_close((u * s) @ vh, _best_approximation("neox", name, max_rank).float(), rtol=0, atol=1e-5)


def _orthonormal_error(q: torch.Tensor) -> float:
    """max |Q^T Q - I| over the batch, for Q (..., m, k)."""
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return (q.double().mT @ q.double() - eye).abs().max().item() if q.shape[-1] else 0.0


MATRICES = arrays(
    np.float64,
    st.tuples(st.lists(st.integers(1, 3), max_size=2), st.integers(1, 7), st.integers(1, 7)).map(
        lambda t: (*t[0], t[1], t[2])
    ),
    # Magnitudes from 1e-6: squares of tinier ones underflow in the reference's own norms, not in the SVD.
    elements=st.one_of(st.just(0.0), st.floats(1e-6, 1e3), st.floats(-1e3, -1e-6)),
)


@FUZZ
@given(matrix=MATRICES, data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_exact_truncated_svd_is_eckart_young_optimal(
    matrix: np.ndarray, data: st.DataObject, dtype: torch.dtype
) -> None:
    w = torch.from_numpy(matrix).to(dtype)
    m, n = w.shape[-2:]
    k = data.draw(st.one_of(st.integers(0, min(m, n)), st.floats(0, 1)), label="rank")
    expected_k = k if isinstance(k, int) else int(k * min(m, n))
    out_dtype = data.draw(st.sampled_from([None, torch.float32, torch.float64]))
    before = fingerprint(w)
    u, s, vh = svd(w, k, dtype=out_dtype)
    assert fingerprint(w) == before
    batch = tuple(w.shape[:-2])
    assert (
        u.shape == (*batch, m, expected_k) and s.shape == (*batch, expected_k) and vh.shape == (*batch, expected_k, n)
    )
    assert u.dtype == s.dtype == vh.dtype == (out_dtype or dtype)
    exact = w.double()
    s_all = torch.linalg.svdvals(exact)
    norm = torch.linalg.matrix_norm(exact).max().item()
    tol = (1e-5 if torch.float32 in (dtype, out_dtype) else 1e-10) * max(norm, 1e-300)
    if expected_k:
        assert (s.double() - s_all[..., :expected_k]).abs().max().item() <= tol
    assert bool((s[..., 1:] <= s[..., :-1]).all()) and bool((s >= 0).all())
    assert _orthonormal_error(u) <= 1e-4 and _orthonormal_error(vh.mT) <= 1e-4
    error = torch.linalg.matrix_norm(exact - (u.double() * s.double()[..., None, :]) @ vh.double())
    optimal = s_all[..., expected_k:].pow(2).sum(-1).sqrt()
    assert (error - optimal).abs().max().item() <= 10 * tol


@FUZZ
@given(matrix=MATRICES, data=st.data(), seed=st.integers(0, 2**32))
def test_randomized_truncated_svd_is_bounded_by_the_optimum(matrix: np.ndarray, data: st.DataObject, seed: int) -> None:
    w = torch.from_numpy(matrix)
    m, n = w.shape[-2:]
    k = data.draw(st.integers(0, min(m, n)), label="rank")
    oversample = data.draw(st.integers(0, 3), label="oversample")
    n_iter = data.draw(st.integers(0, 4), label="n_iter")
    run = [
        svd(
            w,
            k,
            method="randomized",
            n_iter=n_iter,
            oversample=oversample,
            generator=torch.Generator().manual_seed(seed),
        )
        for _ in range(2)
    ]
    u, s, vh = run[0]
    assert all(torch.equal(x, y) for x, y in zip(run[0], run[1])), "the same generator seed gave other factors"
    assert u.shape[-1] == s.shape[-1] == vh.shape[-2] == k
    assert all(bool(torch.isfinite(t).all()) for t in (u, s, vh))
    s_all = torch.linalg.svdvals(w)
    tol = 1e-9 * max(torch.linalg.matrix_norm(w).max().item(), 1e-300)
    assert bool((s[..., 1:] <= s[..., :-1] + tol).all()) and bool((s >= 0).all())
    # Singular values of a projection never exceed the true ones; no rank-k matrix beats the optimum.
    assert bool((s <= s_all[..., :k] + tol).all())
    error = torch.linalg.matrix_norm(w - (u * s[..., None, :]) @ vh)
    assert bool((error >= s_all[..., k:].pow(2).sum(-1).sqrt() - tol).all())


@FUZZ
@given(
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    data=st.data(),
    bias=st.booleans(),
    dtype=st.sampled_from([None, *FLOAT_DTYPES]),
    device=st.sampled_from([None, "cpu", torch.device("cpu"), "meta"]),
)
def test_truncated_linear_constructor_builds_the_documented_shapes(
    in_features: int, out_features: int, data: st.DataObject, bias: bool, dtype: torch.dtype | None, device: Any
) -> None:
    max_rank = min(in_features, out_features)
    rank = data.draw(st.one_of(st.integers(0, max_rank), st.integers(0, max_rank).map(np.int64), st.floats(0, 1)))
    k = int(rank * max_rank) if isinstance(rank, float) else int(rank)
    layer = TruncatedLinear(in_features, out_features, rank, bias=bias, device=device, dtype=dtype)  # type: ignore[arg-type]
    assert layer.rank == k and layer.a.shape == (k, in_features) and layer.b.shape == (out_features, k)
    assert (layer.bias is not None) == bias and layer.method is None
    assert layer.a.dtype == (dtype or torch.get_default_dtype())
    assert layer.a.device.type == ("meta" if device == "meta" else "cpu")
    if device != "meta" and layer.a.dtype in (torch.float32, torch.float64):
        x = torch.randn(3, in_features, dtype=layer.a.dtype, generator=torch.Generator().manual_seed(k))
        expected = x.double() @ (layer.b.double() @ layer.a.double()).T
        if bias:
            expected = expected + layer.bias.double()
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@FUZZ
@given(
    shape=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    data=st.data(),
    seed=st.integers(0, 2**32),
    with_bias=st.booleans(),
    method=st.sampled_from([None, *METHODS]),
    requires_grad=st.booleans(),
    dtype=st.sampled_from([None, torch.float32, torch.float64]),
)
def test_from_svd_splits_the_singular_values_evenly(
    shape: tuple[int, int],
    data: st.DataObject,
    seed: int,
    with_bias: bool,
    method: str | None,
    requires_grad: bool,
    dtype: torch.dtype | None,
) -> None:
    out_features, in_features = shape
    r = data.draw(st.integers(0, min(shape)), label="rank")
    g = torch.Generator().manual_seed(seed)
    u, vh = torch.randn(out_features, r, generator=g), torch.randn(r, in_features, generator=g)
    s = torch.rand(r, generator=g) * 10
    bias = torch.randn(out_features, generator=g) if with_bias else None
    layer = TruncatedLinear.from_svd(u, s, vh, bias=bias, method=method, dtype=dtype, requires_grad=requires_grad)
    assert (layer.in_features, layer.out_features, layer.rank) == (in_features, out_features, r)
    assert layer.method == method and layer.a.dtype == (dtype or torch.float32)
    assert all(p.requires_grad == requires_grad for p in layer.parameters())
    root = s.double().sqrt()
    torch.testing.assert_close(layer.a.double(), root[:, None] * vh.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.b.double(), u.double() * root, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight.double(), (u.double() * s.double()) @ vh.double(), rtol=1e-5, atol=1e-5)
    if with_bias:
        assert bias is not None and layer.bias is not None and torch.equal(layer.bias.to(bias.dtype), bias)


@FUZZ
@given(
    shape=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    data=st.data(),
    seed=st.integers(0, 2**32),
    conv=st.booleans(),
    bias=st.booleans(),
    frozen=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_from_linear_is_the_best_rank_k_approximation(
    shape: tuple[int, int], data: st.DataObject, seed: int, conv: bool, bias: bool, frozen: bool, dtype: torch.dtype
) -> None:
    from transformers.pytorch_utils import Conv1D

    out_features, in_features = shape
    torch.manual_seed(seed)
    source: nn.Module = Conv1D(out_features, in_features) if conv else nn.Linear(in_features, out_features, bias=bias)
    if conv and not bias:
        source.register_parameter("bias", None)
    with torch.no_grad():
        weight(source).normal_()
    source.to(dtype).requires_grad_(not frozen)
    rank = data.draw(st.one_of(st.integers(0, min(shape)), st.floats(0, 1)), label="rank")
    k = int(rank * min(shape)) if isinstance(rank, float) else rank
    before = fingerprint(source)
    layer = TruncatedLinear.from_linear(source, rank)
    assert fingerprint(source) == before
    assert (layer.out_features, layer.in_features, layer.rank) == (out_features, in_features, k)
    assert layer.a.dtype == dtype and all(p.requires_grad != frozen for p in layer.parameters())
    w = _weight(source).double()
    s_all = torch.linalg.svdvals(w)
    error = torch.linalg.matrix_norm(w - layer.weight.double()).item()
    tol = (1e-5 if dtype == torch.float32 else 1e-10) * max(s_all[0].item(), 1e-300)
    assert error == pytest.approx(s_all[k:].pow(2).sum().sqrt().item(), abs=10 * tol)
    if source.bias is None:
        assert layer.bias is None
    else:
        assert torch.equal(bias_of(layer), bias_of(source))  # type: ignore[arg-type]


@FUZZ
@given(out_features=st.integers(0, 10**6), in_features=st.integers(0, 10**6), data=st.data())
def test_resolve_rank_follows_the_documented_rule(out_features: int, in_features: int, data: st.DataObject) -> None:
    max_rank = min(out_features, in_features)
    rank = data.draw(
        st.one_of(
            st.integers(0, max_rank),
            st.integers(0, max_rank).map(np.int64),
            st.floats(0, 1),
            st.floats(0, 1, width=32).map(np.float32),
        )
    )
    resolved = resolve_rank(rank, out_features, in_features)
    assert type(resolved) is int and 0 <= resolved <= max_rank
    if isinstance(rank, float | np.floating):
        assert resolved == int(float(rank) * max_rank)
    else:
        assert resolved == rank


@FUZZ
@given(
    layers=st.one_of(
        st.none(),
        st.integers(),
        st.integers(-100, 100).map(np.int64),
        st.lists(st.one_of(st.integers(-9, 9), st.integers(-9, 9).map(np.int32)), max_size=4),
        st.lists(st.integers(-9, 9), max_size=4).map(tuple),
        st.tuples(st.integers(-3, 3), st.integers(4, 9)).map(lambda t: range(*t)),
    ),
    matrices=st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=3), st.just(("mlp", "attn"))),
)
def test_targets_keeps_plain_ints_and_strings(layers: Any, matrices: Any) -> None:
    targets = Targets(layers=layers, matrices=matrices)
    if layers is None:
        assert targets.layers is None
    elif isinstance(layers, list | tuple | range):
        assert targets.layers == [int(x) for x in layers] and all(type(x) is int for x in targets.layers)
    else:
        assert targets.layers == int(layers) and type(targets.layers) is int
    assert targets.matrices == (matrices if isinstance(matrices, str) else list(matrices))


@FUZZ
@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    sizes=st.tuples(st.integers(1, 6), st.integers(0, 4), st.integers(1, 6)),
    with_bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**32),
)
def test_lowrank_linear_equals_the_two_products(
    batch: list[int], sizes: tuple[int, int, int], with_bias: bool, dtype: torch.dtype, seed: int
) -> None:
    in_features, r, out_features = sizes
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, in_features, generator=g, dtype=dtype)
    a, b = torch.randn(r, in_features, generator=g, dtype=dtype), torch.randn(out_features, r, generator=g, dtype=dtype)
    bias = torch.randn(out_features, generator=g, dtype=dtype) if with_bias else None
    y = lowrank_linear(x, a, b, bias)
    expected = (x.double() @ a.double().T) @ b.double().T + (0 if bias is None else bias.double())
    assert y.shape == (*batch, out_features) and y.dtype == dtype
    torch.testing.assert_close(y.double(), expected.expand(*batch, out_features), rtol=1e-5, atol=1e-5)
