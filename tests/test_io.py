"""save_truncated / load_truncated: bit-exact round trips, atomic saves, and a tamper suite for loading.

Every tamper case alters one thing in a good save (a field of truncation.json, a tensor of
model.safetensors, the files themselves) or loads it into a model of another shape, and checks that
``load_truncated`` refuses with a one-line error naming the file, leaving the model byte-identical.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import fasttrunc.io as ftio
from fasttrunc import Targets, TruncatedLinear, load_truncated, save_truncated, truncate_

SPEC, WEIGHTS = ftio.SPEC_FILE, ftio.WEIGHTS_FILE


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


# --- tiny models and their saves ---------------------------------------------------------------


def tiny(model_class: str, config_class: str, seed: int, **config: Any) -> nn.Module:
    """A tiny transformers model with random weights (seeded)."""
    import transformers

    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()


def tiny_neox(seed: int = 0, layers: int = 2, vocab: int = 50) -> nn.Module:
    return tiny(
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        seed,
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def tiny_gpt2(seed: int = 0, layers: int = 2, positions: int = 32, vocab: int = 50) -> nn.Module:
    return tiny(
        "GPT2LMHeadModel",
        "GPT2Config",
        seed,
        vocab_size=vocab,
        n_positions=positions,
        n_embd=16,
        n_layer=layers,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )


def truncate_neox(model: nn.Module) -> None:
    """Exact, randomized and rank-0 truncations; with and without bias."""
    truncate_(model, Targets(layers=0, matrices="mlp_in"), 3)
    truncate_(model, Targets(layers=0, matrices="mlp_out"), 0)
    truncate_(model, Targets(layers=1, matrices="attn_qkv"), 5, method="randomized")
    truncate_(model, "lm_head", 4, method="randomized", generator=torch.Generator().manual_seed(1))


def truncate_gpt2(model: nn.Module) -> None:
    """Conv1D truncations; the tied lm_head / wte stay as they are."""
    truncate_(model, r"transformer\.h\.0\.attn\.c_attn", 3)
    truncate_(model, r"transformer\.h\.1\.mlp\.c_proj", 0)
    truncate_(model, r"transformer\.h\.1\.mlp\.c_fc", 6, method="randomized")


@dataclass(frozen=True)
class Setup:
    name: str
    build: Callable[..., nn.Module]
    truncate: Callable[[nn.Module], None]


SETUPS = {"neox": Setup("neox", tiny_neox, truncate_neox), "gpt2": Setup("gpt2", tiny_gpt2, truncate_gpt2)}


@functools.cache
def saved_layout(setup_name: str) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """The spec and the safetensors header (name -> shape, dtype) of a setup's save, read from a real save."""
    setup = SETUPS[setup_name]
    model = setup.build(seed=1)
    setup.truncate(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_truncated(model, Path(tmp) / "save")
        spec = json.loads((Path(tmp) / "save" / SPEC).read_text())
        with safe_open(str(Path(tmp) / "save" / WEIGHTS), "pt") as f:
            header = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    return spec, header


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def module_types(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    """Per setup: a good save and the (seed 1) truncated model it came from."""
    out = {}
    for name, setup in SETUPS.items():
        model = setup.build(seed=1)
        setup.truncate(model)
        out[name] = (save_truncated(model, tmp_path_factory.mktemp(name) / "save"), model)
    return out


@pytest.fixture(scope="module")
def fresh_models() -> dict[str, nn.Module]:
    """Untruncated models with other random weights; each test loads into a deep copy."""
    return {name: setup.build(seed=2) for name, setup in SETUPS.items()}


# --- tamper cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    setup: str
    id: str
    apply: Callable[[Path], None]  # alters the copy of the save in this directory
    file: str = SPEC  # the file the message must name
    names: str | None = None  # what else the message must name
    error: type[Exception] = ValueError
    model: Callable[[], nn.Module] | None = None  # load into this model instead of the fresh one


def edit_spec(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        spec = json.loads((directory / SPEC).read_text())
        change(spec)
        (directory / SPEC).write_text(json.dumps(spec))

    return apply


def write_bytes(name: str, data: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / name
        path.write_bytes(data(path.read_bytes()))

    return apply


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        with safe_open(str(directory / WEIGHTS), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        change(tensors)
        save_file(tensors, str(directory / WEIGHTS), metadata=metadata)

    return apply


def remove(name: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).unlink()


def set_field(module: str, field: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        spec["modules"][module][field] = value

    return change


def del_field(module: str, field: str) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec["modules"][module].pop(field)


def set_entry(module: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec["modules"].update({module: value})


def del_entry(module: str) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec["modules"].pop(module)


def set_key(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec.update({key: value})


def del_key(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec.pop(key)


def field_values(entry: dict[str, Any]) -> dict[str, list[tuple[str, object, str]]]:
    """Per field: (label, bad value, the file the error must name).

    Wrong types, out-of-range values, null and lists are refused by the spec check; in-range values
    that the weights contradict (another rank, a flipped bias) by the check of the safetensors header.
    """
    rank, out_f, in_f = entry["rank"], entry["out_features"], entry["in_features"]
    other_rank = rank + 1 if rank < min(out_f, in_f) else rank - 1
    sizes = [("str", "8"), ("float", 8.0), ("bool", True), ("zero", 0), ("negative", -1), ("list", [8]), ("null", None)]
    values: dict[str, list[tuple[str, object]]] = {
        "rank": [
            ("str", str(rank)),
            ("fraction", rank + 0.7),
            ("float_integral", float(rank)),
            ("bool", True),
            ("negative", -1),
            ("above_max", min(out_f, in_f) + 1),
            ("null", None),
            ("list", [rank]),
        ],
        "method": [("int", 1), ("evil", "evil"), ("upper", "EXACT"), ("list", ["exact"]), ("object", {})],
        "in_features": [*sizes, ("off_by_one", in_f + 1)],
        "out_features": [*sizes, ("off_by_one", out_f + 1)],
        "bias": [("int", 1), ("str", "true"), ("null", None), ("list", [True])],
    }
    out = {field: [(label, value, SPEC) for label, value in pairs] for field, pairs in values.items()}
    out["rank"].append(("other_in_range", other_rank, WEIGHTS))
    out["bias"].append(("flipped", not entry["bias"], WEIGHTS))
    return out


def spec_cases(setup: str) -> list[Case]:
    spec, _ = saved_layout(setup)
    cases: list[Case] = []
    for module, entry in spec["modules"].items():
        for field, values in field_values(entry).items():
            for label, value, file in values:
                change = edit_spec(set_field(module, field, value))
                cases.append(Case(setup, f"{module}.{field}={label}", change, file=file, names=module))
            cases.append(Case(setup, f"{module}.{field}_removed", edit_spec(del_field(module, field)), names=module))
        cases.append(Case(setup, f"{module}_removed", edit_spec(del_entry(module)), file=WEIGHTS, names=module))
        for label, bad in (("null", None), ("list", [entry]), ("number", 3), ("extra_key", {**entry, "x": 1})):
            cases.append(Case(setup, f"{module}={label}", edit_spec(set_entry(module, bad)), names=module))
    first = next(iter(spec["modules"].values()))
    extra_entries = {
        "untruncated_linear": "lm_head" if setup == "gpt2" else "gpt_neox.layers.1.mlp.dense_4h_to_h",
        "missing_module": "nowhere.dense",
        "layer_norm": "transformer.ln_f" if setup == "gpt2" else "gpt_neox.final_layer_norm",
        "root": "",
    }
    for label, name in extra_entries.items():
        added: dict[str, Any] = first
        if setup == "gpt2" and label == "untruncated_linear":
            added = {"rank": 2, "method": "exact", "in_features": 16, "out_features": 50, "bias": False}
        elif label == "untruncated_linear":
            added = {"rank": 2, "method": "exact", "in_features": 40, "out_features": 16, "bias": True}
        add = edit_spec(set_entry(name, added))
        file = WEIGHTS if label == "untruncated_linear" else SPEC
        cases.append(Case(setup, f"extra_entry_{label}", add, file=file, names=name or "root"))
    top_level: dict[str, list[tuple[str, object]]] = {
        "format": [("changed", "fasttrunc-truncation/2"), ("int", 1), ("null", None), ("list", [ftio.FORMAT])],
        "model_class": [("changed", "OtherModel"), ("int", 1), ("null", None), ("list", ["x"])],
        "modules": [("list", []), ("null", None), ("str", "x"), ("number", 1)],
    }
    for key, pairs in top_level.items():
        for label, wrong in pairs:
            cases.append(Case(setup, f"{key}={label}", edit_spec(set_key(key, wrong))))
        cases.append(Case(setup, f"{key}_removed", edit_spec(del_key(key))))
    cases.append(Case(setup, "extra_top_level_key", edit_spec(set_key("x", 1))))
    for label, data in {
        "truncated_half": lambda b: b[: len(b) // 2],
        "garbage": lambda b: b"\x00\xff garbage \x80" * 7,
        "empty": lambda b: b"",
        "list": lambda b: b"[]",
        "null": lambda b: b"null",
        "string": lambda b: b'"fasttrunc"',
        "duplicate_key": lambda b: b[:-2] + b', "format": "fasttrunc-truncation/1"}\n',
        "nested_too_deeply": lambda b: b"[" * 100_000 + b"]" * 100_000,
    }.items():
        cases.append(Case(setup, f"spec_file_{label}", write_bytes(SPEC, data)))
    cases.append(Case(setup, "spec_file_removed", remove(SPEC), error=FileNotFoundError))
    return cases


def reshaped(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1)


def tensor_cases(setup: str) -> list[Case]:
    _, header = saved_layout(setup)
    cases: list[Case] = []
    for key in header:
        for label, change in {
            "reshaped": lambda ts, k=key: ts.update({k: reshaped(ts[k])}),
            "float64": lambda ts, k=key: ts.update({k: ts[k].double()}),
            "removed": lambda ts, k=key: ts.pop(k),
        }.items():
            cases.append(Case(setup, f"{key}:{label}", edit_tensors(change), file=WEIGHTS, names=key))
    cases.append(
        Case(
            setup,
            "extra_tensor",
            edit_tensors(lambda ts: ts.update({"extra.weight": torch.zeros(2)})),
            file=WEIGHTS,
            names="extra.weight",
        )
    )
    if setup == "gpt2":  # tied: the file holds lm_head.weight for both; both copies present is refused too
        both = lambda ts: ts.update({"transformer.wte.weight": ts["lm_head.weight"].clone()})  # noqa: E731
        cases.append(Case(setup, "tied_both_saved", edit_tensors(both), file=WEIGHTS, names="transformer.wte.weight"))
    for label, data in {
        "truncated_half": lambda b: b[: len(b) // 2],
        "garbage": lambda b: os.urandom(256),
        "empty": lambda b: b"",
        "header_only": lambda b: b[: 8 + int.from_bytes(b[:8], "little")],
    }.items():
        cases.append(Case(setup, f"weights_file_{label}", write_bytes(WEIGHTS, data), file=WEIGHTS))
    cases.append(Case(setup, "weights_file_removed", remove(WEIGHTS), file=WEIGHTS, error=FileNotFoundError))
    return cases


def model_cases() -> list[Case]:
    keep = lambda directory: None  # noqa: E731
    return [
        Case("neox", "other_vocabulary", keep, names="lm_head", model=lambda: tiny_neox(vocab=60)),
        Case("neox", "fewer_layers", keep, names="gpt_neox.layers.1", model=lambda: tiny_neox(layers=1)),
        Case("neox", "more_layers", keep, file=WEIGHTS, names="gpt_neox.layers.2", model=lambda: tiny_neox(layers=3)),
        Case("gpt2", "other_max_length", keep, file=WEIGHTS, names="wpe", model=lambda: tiny_gpt2(positions=48)),
        Case("gpt2", "other_vocabulary", keep, file=WEIGHTS, names="lm_head", model=lambda: tiny_gpt2(vocab=60)),
        Case("gpt2", "fewer_layers", keep, names="transformer.h.1", model=lambda: tiny_gpt2(layers=1)),
        Case("gpt2", "another_family", keep, names="GPT2LMHeadModel", model=lambda: tiny_neox()),
    ]


TAMPER_CASES = [case for setup in SETUPS for case in spec_cases(setup) + tensor_cases(setup)] + model_cases()


def assert_one_line(exc: BaseException, *parts: str) -> None:
    message = str(exc)
    assert "\n" not in message and message.strip(), message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("case", TAMPER_CASES, ids=[f"{c.setup}-{c.id}" for c in TAMPER_CASES])
def test_tampered_save_is_refused_and_model_unchanged(case, saves, fresh_models, tmp_path):
    directory = tmp_path / "save"
    shutil.copytree(saves[case.setup][0], directory)
    case.apply(directory)
    model = case.model() if case.model is not None else copy.deepcopy(fresh_models[case.setup])
    before, types = state_hash(model), module_types(model)
    with pytest.raises(case.error) as info:
        load_truncated(model, directory)
    assert type(info.value) is case.error
    assert_one_line(info.value, str(directory / case.file), *([case.names] if case.names is not None else []))
    assert state_hash(model) == before
    assert module_types(model) == types
    assert not any(isinstance(m, TruncatedLinear) for m in model.modules())


def test_the_tamper_suite_covers_every_field_entry_and_tensor():
    for setup in SETUPS:
        spec, header = saved_layout(setup)
        ids = {c.id for c in TAMPER_CASES if c.setup == setup}
        for module, entry in spec["modules"].items():
            assert {f"{module}.{field}_removed" for field in entry} <= ids
            assert f"{module}_removed" in ids
        assert {f"{key}:{label}" for key in header for label in ("reshaped", "float64", "removed")} <= ids
        assert len(spec["modules"]) >= 3 and any(e["rank"] == 0 for e in spec["modules"].values())
        assert {e["method"] for e in spec["modules"].values()} == {"exact", "randomized"}


# --- round trips -------------------------------------------------------------------------------


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("setup", list(SETUPS))
def test_round_trip_is_bit_exact(setup, saves, fresh_models):
    directory, source = saves[setup]
    model = copy.deepcopy(fresh_models[setup])
    x = torch.randint(1, 50, (2, 9))
    truncation = load_truncated(model, directory)
    assert set(truncation) == set(ftio.truncation_spec(source))
    assert module_types(model) == module_types(source)
    assert_same_state(model, source)
    for name, module in truncation.items():
        original = source.get_submodule(name)
        assert (module.rank, module.method, module.bias is None) == (
            original.rank,
            original.method,
            original.bias is None,
        )
    with torch.no_grad():
        assert torch.equal(model(x).logits, source(x).logits)
    truncation.restore()
    assert not any(isinstance(m, TruncatedLinear) for m in model.modules())


def test_gpt2_ties_survive_the_round_trip(saves, fresh_models):
    directory, source = saves["gpt2"]
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        assert "lm_head.weight" in f.keys() and "transformer.wte.weight" not in f.keys()
    model = copy.deepcopy(fresh_models["gpt2"])
    load_truncated(model, directory)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.transformer.wte.weight, source.transformer.wte.weight)


def test_truncated_tied_lm_head_round_trips(tmp_path):
    source = tiny_gpt2(seed=3)
    truncate_(source, "lm_head", 5)
    save_truncated(source, tmp_path / "save")
    model = tiny_gpt2(seed=4)
    load_truncated(model, tmp_path / "save")
    assert_same_state(model, source)


def test_a_model_without_truncations_saves_its_plain_state(tmp_path):
    source = tiny_neox(seed=5)
    save_truncated(source, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / SPEC).read_text())["modules"] == {}
    model = tiny_neox(seed=6)
    assert len(load_truncated(model, tmp_path / "plain")) == 0
    assert_same_state(model, source)


@pytest.mark.gpu
def test_round_trip_and_rollback_on_cuda(saves, fresh_models, monkeypatch):
    directory, source = saves["neox"]
    model = copy.deepcopy(fresh_models["neox"]).cuda()
    before = state_hash(model)

    def fail(*args: Any) -> None:
        raise RuntimeError("simulated")

    monkeypatch.setattr(ftio, "replace_modules_", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        load_truncated(model, directory)
    assert state_hash(model) == before
    monkeypatch.undo()
    truncation = load_truncated(model, directory)
    assert all(p.is_cuda for m in truncation.values() for p in m.parameters())
    assert_same_state(model.cpu(), source)


def test_load_keeps_requires_grad_and_training_mode(saves):
    model = tiny_neox(seed=2).train()
    model.gpt_neox.layers[0].mlp.dense_h_to_4h.requires_grad_(False)
    truncation = load_truncated(model, saves["neox"][0])
    frozen = truncation["gpt_neox.layers.0.mlp.dense_h_to_4h"]
    assert frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in truncation["lm_head"].parameters())


# --- loading: a failure after the checks, and bad arguments ------------------------------------


@pytest.mark.parametrize("fail_at", [1, 5, -1])
def test_a_failure_while_copying_puts_everything_back(fail_at, saves, fresh_models, monkeypatch):
    model = copy.deepcopy(fresh_models["neox"])
    before, types = state_hash(model), module_types(model)
    real, calls = ftio._copy, []
    total = len(saved_layout("neox")[1])
    at = total if fail_at == -1 else fail_at

    def flaky(destination: torch.Tensor, source: torch.Tensor) -> None:
        calls.append(1)
        real(destination, source)  # the copy happens, then the failure: the rollback must undo it
        if len(calls) == at:
            raise RuntimeError("simulated failure while loading")

    monkeypatch.setattr(ftio, "_copy", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        load_truncated(model, saves["neox"][0])
    assert len(calls) == at
    assert state_hash(model) == before and module_types(model) == types


def test_a_failure_while_swapping_puts_everything_back(saves, fresh_models, monkeypatch):
    model = copy.deepcopy(fresh_models["neox"])
    before, types = state_hash(model), module_types(model)
    real = ftio.replace_modules_

    def swap_then_fail(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise RuntimeError("simulated failure after the swap")

    monkeypatch.setattr(ftio, "replace_modules_", swap_then_fail)
    with pytest.raises(RuntimeError, match="after the swap"):
        load_truncated(model, saves["neox"][0])
    assert state_hash(model) == before and module_types(model) == types


def test_load_refuses_an_already_truncated_model(saves, fresh_models):
    model = copy.deepcopy(fresh_models["neox"])
    truncate_(model, "lm_head", 2)
    before = state_hash(model)
    with pytest.raises(ValueError, match=re.escape("saved module 'lm_head' is already truncated")):
        load_truncated(model, saves["neox"][0])
    assert state_hash(model) == before


@pytest.mark.parametrize("function", [save_truncated, load_truncated])
def test_bad_arguments_are_one_line_errors(function, saves, tmp_path):
    with pytest.raises(TypeError, match="needs a torch.nn.Module") as info:
        function("not a model", tmp_path)
    assert_one_line(info.value, "str")
    for directory in (None, 3, ""):
        with pytest.raises(TypeError, match="needs a directory path") as info:
            function(tiny_neox(), directory)
        assert_one_line(info.value)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="meta device") as info:
        function(meta, saves["neox"][0] if function is load_truncated else tmp_path / "meta")
    assert_one_line(info.value)


def test_a_bare_truncated_linear_is_refused(tmp_path):
    layer = TruncatedLinear.from_linear(nn.Linear(6, 4), 2)
    with pytest.raises(ValueError, match="wrap it in a container module"):
        save_truncated(layer, tmp_path / "bare")
    assert os.listdir(tmp_path) == []


def test_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere' / SPEC} does not exist")):
        load_truncated(tiny_neox(), tmp_path / "nowhere")


# --- saving: atomic, replaces a save, refuses what is not one ----------------------------------


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture()
def old_save(tmp_path) -> tuple[Path, dict[str, bytes]]:
    model = tiny_neox(seed=7)
    truncate_(model, "lm_head", 3)
    target = save_truncated(model, tmp_path / "out" / "save")
    return target, listing(target)


def test_saving_over_a_save_replaces_it_completely(old_save):
    target, old = old_save
    model = tiny_neox(seed=8)
    truncate_(model, Targets(layers=0, matrices="mlp"), 2)
    assert save_truncated(model, target) == target
    assert sorted(os.listdir(target.parent)) == ["save"]
    assert set(json.loads((target / SPEC).read_text())["modules"]) == set(ftio.truncation_spec(model))
    assert listing(target)[WEIGHTS] != old[WEIGHTS]
    fresh = tiny_neox(seed=9)
    load_truncated(fresh, target)
    assert_same_state(fresh, model)


def test_saving_into_an_empty_directory_and_a_relative_path(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert save_truncated(tiny_neox(), "empty") == tmp_path / "empty"
    assert sorted(os.listdir(tmp_path / "empty")) == sorted([SPEC, WEIGHTS])


@pytest.mark.parametrize(
    "fail_in",
    ["weights", "spec", "rename"],
)
def test_a_failure_mid_save_leaves_the_old_save_and_no_temporary_directory(fail_in, old_save, monkeypatch):
    target, old = old_save
    if fail_in == "weights":

        def broken(model: nn.Module, filename: str) -> None:
            Path(filename).write_bytes(b"half a file")
            raise OSError("simulated: disk full")

        monkeypatch.setattr(ftio, "save_model", broken)
    elif fail_in == "spec":

        def broken_spec(path: Path, spec: object) -> None:
            path.write_text('{"format": ')
            raise OSError("simulated: disk full")

        monkeypatch.setattr(ftio, "_write_spec", broken_spec)
    else:
        real, renames = os.rename, []

        def second_rename_fails(src: Any, dst: Any) -> None:
            renames.append((src, dst))
            if len(renames) == 2:
                raise OSError("simulated: rename failed")
            real(src, dst)

        monkeypatch.setattr(os, "rename", second_rename_fails)
    model = tiny_neox(seed=8)
    with pytest.raises(OSError, match="simulated"):
        save_truncated(model, target)
    monkeypatch.undo()
    assert listing(target) == old
    assert sorted(os.listdir(target.parent)) == ["save"]


def test_a_first_save_that_fails_leaves_nothing(tmp_path, monkeypatch):
    def broken(model: nn.Module, filename: str) -> None:
        raise RuntimeError("simulated")

    monkeypatch.setattr(ftio, "save_model", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        save_truncated(tiny_neox(), tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_the_save_directory_gets_the_usual_mode_or_keeps_its_own(tmp_path):
    (tmp_path / "plain").mkdir()
    target = save_truncated(tiny_neox(), tmp_path / "new")
    assert target.stat().st_mode == (tmp_path / "plain").stat().st_mode
    target.chmod(0o750)
    save_truncated(tiny_neox(), target)
    assert target.stat().st_mode & 0o7777 == 0o750


def test_the_working_directory_is_not_replaced(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for directory in (".", tmp_path):
        with pytest.raises(ValueError, match="holds the working directory") as info:
            save_truncated(tiny_neox(), directory)
        assert_one_line(info.value)
    assert os.listdir(work) == [] and os.listdir(tmp_path) == ["work"]


def test_a_directory_with_other_files_is_refused(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    (target / SPEC).write_text("{}")
    with pytest.raises(ValueError, match="it holds notes.txt, which a fasttrunc save does not") as info:
        save_truncated(tiny_neox(), target)
    assert_one_line(info.value, str(target))
    assert listing(target) == {SPEC: b"{}", "notes.txt": b"keep me"}


def test_a_target_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target, part in ((blocker, "it is a file"), (blocker / "save", f"{blocker} is a file")):
        with pytest.raises(ValueError, match=re.escape(part)) as info:
            save_truncated(tiny_neox(), target)
        assert_one_line(info.value, str(target))
    assert os.listdir(tmp_path) == ["file"] and blocker.read_text() == "x"


def test_a_parent_the_filesystem_refuses_is_a_value_error(tmp_path, monkeypatch):
    # Stands in for a read-only parent: tests run as root (CI), which permission bits do not stop.
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ftio.tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError, match="Permission denied") as info:
        save_truncated(tiny_neox(), tmp_path / "save")
    assert_one_line(info.value, str(tmp_path / "save"))
    assert os.listdir(tmp_path) == []
