"""Save and load truncated models: the state dict (safetensors) plus a JSON of name -> rank/method/shape.

Loading rebuilds the swaps on a fresh (untruncated) model of the same architecture, then loads the
weights. ``from_pretrained`` alone would silently re-initialise swapped layers.

Both directions are all-or-nothing. :func:`load_truncated` checks the whole of ``truncation.json``
and the safetensors header against the model as it would be rebuilt before it changes anything, and
puts every tensor back if the load fails after all. :func:`save_truncated` writes into a temporary
directory beside the target and renames it into place, so a failed save leaves the old one intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn

from fasttrunc.families import kind_names, module_kind
from fasttrunc.linear import TruncatedLinear
from fasttrunc.svd import METHODS
from fasttrunc.truncation import Truncation, _set_submodule, replace_modules_

SPEC_FILE = "truncation.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fasttrunc-truncation/1"
SPEC_KEYS = ("format", "model_class", "modules")
ENTRY_KEYS = ("rank", "method", "in_features", "out_features", "bias")

# How the safetensors header names the dtypes a model can hold.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Shape = tuple[int, ...]


def truncation_spec(model: nn.Module) -> dict[str, dict[str, object]]:
    """name -> {rank, method, in_features, out_features, bias} for every TruncatedLinear."""
    return {
        name: {
            "rank": m.rank,
            "method": m.method,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, TruncatedLinear)
    }


def _check_model(model: object, function: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{function} needs a torch.nn.Module as model; got {type(model).__name__}")
    return model


def _check_directory(directory: object, function: str) -> Path:
    if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
        shown = repr(directory) if isinstance(directory, str | int | float | bool | None) else type(directory).__name__
        raise TypeError(f"{function} needs a directory path (str or os.PathLike); got {shown}")
    return Path(directory)


def _check_materialized(model: nn.Module, function: str) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{function}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.device.type == "meta":
            raise ValueError(
                f"{function}: {key} is on the meta device and holds no values; materialize the model first"
            )
    return state


# --- saving ------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_spec(path: Path, spec: Mapping[str, object]) -> None:
    path.write_text(json.dumps(spec, indent=2) + "\n")


def _prepare_target(target: Path) -> Path:
    """Check that ``target`` can take a save (creating its parents); return its parent directory."""
    if target.name in ("", ".", ".."):
        raise ValueError(f"cannot save into {target}; give a directory below it")
    for ancestor in reversed(target.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise ValueError(f"cannot save into {target}: {ancestor} is a file, not a directory")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise ValueError(f"cannot save into {target}: it is a file, not a directory")
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            raise ValueError(f"cannot save into {target}: it holds the working directory, which a save would replace")
        foreign = sorted(
            entry.name
            for entry in target.iterdir()
            if entry.name not in (SPEC_FILE, WEIGHTS_FILE) or not entry.is_file() or entry.is_symlink()
        )
        if foreign:
            raise ValueError(
                f"cannot save into {target}: it holds {', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}, which a fasttrunc save does not; "
                f"give a new or empty directory, or one that holds only {SPEC_FILE} and {WEIGHTS_FILE}"
            )
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot save into {target}: cannot create {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot save into {target}: {parent} is not writable")
    return parent


def _directory_mode(target: Path) -> int:
    """The mode the save directory gets: the old one's, or what ``mkdir`` would give under the umask."""
    if target.is_dir():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def _move_into_place(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``; an existing save there is moved aside first and removed after."""
    if not (target.exists() or target.is_symlink()):
        os.rename(staged, target)
        return
    aside = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
    os.rename(target, aside)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_truncated(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` and ``truncation.json`` into ``directory``; return its path.

    The save is atomic: both files are written into a temporary directory beside ``directory`` (on
    the same filesystem) and that directory is renamed into place, so a failure at any point
    leaves whatever was there before untouched and no temporary directory behind. A directory
    that already holds a save (only ``truncation.json`` and ``model.safetensors``), or an empty
    one, is **replaced completely**; a directory that holds anything else is refused, so a save
    never deletes other files. Missing parents are created.

    A model without any ``TruncatedLinear`` is allowed: it saves the plain state dict with an
    empty module table, and loading it truncates nothing. Errors are one line: a ``TypeError``
    for a model that is not an ``nn.Module`` or a directory that is not a path, a ``ValueError``
    naming the path for a target that is a file, lies under a file or cannot be written, and for
    a model with tensors on the meta device or one that is itself a ``TruncatedLinear``.
    """
    _check_model(model, "save_truncated")
    target = _check_directory(directory, "save_truncated").expanduser().resolve()
    _check_materialized(model, "save_truncated")
    modules = truncation_spec(model)
    if "" in modules:
        raise ValueError("save_truncated: the model itself is a TruncatedLinear; wrap it in a container module")
    parent = _prepare_target(target)
    spec = {"format": FORMAT, "model_class": type(model).__name__, "modules": modules}
    try:
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise ValueError(f"cannot save into {target}: cannot write to {parent} ({exc.strerror or exc})") from None
    try:
        save_model(model, str(staged / WEIGHTS_FILE))
        _write_spec(staged / SPEC_FILE, spec)
        for path in (staged / WEIGHTS_FILE, staged / SPEC_FILE, staged):
            _fsync(path)
        staged.chmod(_directory_mode(target))  # mkdtemp's 0o700 would hide the save from others
        _move_into_place(staged, target)
        _fsync(parent)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return target


# --- loading: truncation.json ------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    rank: int
    method: str | None
    in_features: int
    out_features: int
    bias: bool


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"key {repeated[0]!r} appears more than once")
    return dict(pairs)


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; expected the JSON that save_truncated writes") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid for fasttrunc: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} nests its JSON too deeply; expected the JSON that save_truncated writes") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} holds {_show(spec)}; expected a JSON object with keys {', '.join(SPEC_KEYS)}")
    return spec


def _check_keys(path: Path, where: str, mapping: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in mapping]
    extra = [k for k in mapping if k not in keys]
    if missing or extra:
        problem = f"lacks key {missing[0]!r}" if missing else f"has unknown key {extra[0]!r}"
        raise ValueError(f"{path}: {where} {problem}; expected exactly the keys {', '.join(keys)}")


def _plain_int(value: object) -> bool:
    return type(value) is int


def _show(value: object) -> str:
    """``value`` as JSON, cut to a readable length."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_entry(path: Path, model: nn.Module, name: str, entry: object) -> tuple[_Entry, nn.Module]:
    where = f"modules[{name!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} is {_show(entry)}; expected an object with keys {', '.join(ENTRY_KEYS)}")
    _check_keys(path, where, entry, ENTRY_KEYS)
    for key in ("in_features", "out_features"):
        value = entry[key]
        if not _plain_int(value) or value < 1:
            raise ValueError(f"{path}: {where}.{key} is {_show(value)}; expected a positive integer")
    if not isinstance(entry["bias"], bool):
        raise ValueError(f"{path}: {where}.bias is {_show(entry['bias'])}; expected true or false")
    method = entry["method"]
    if not (method is None or (isinstance(method, str) and method in METHODS)):
        allowed = ", ".join(json.dumps(m) for m in (*METHODS, None))
        raise ValueError(f"{path}: {where}.method is {_show(method)}; expected one of {allowed}")
    out_features, in_features = entry["out_features"], entry["in_features"]
    rank, max_rank = entry["rank"], min(out_features, in_features)
    if not _plain_int(rank) or not 0 <= rank <= max_rank:
        raise ValueError(f"{path}: {where}.rank is {_show(rank)}; expected an integer in [0, {max_rank}]")
    if name == "":
        raise ValueError(f"{path}: {where} names the root module, which cannot be truncated in place")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path}: saved module {name!r} does not exist in {type(model).__name__}") from None
    if isinstance(module, TruncatedLinear):
        raise ValueError(f"{path}: saved module {name!r} is already truncated in this model; load into a fresh one")
    kind = module_kind(module)
    if kind is None:
        raise ValueError(f"{path}: saved module {name!r} is a {type(module).__name__} here, not one of {kind_names()}")
    shape = kind.shape(module)
    if shape != (out_features, in_features):
        raise ValueError(
            f"{path}: saved module {name!r} is (out, in) = {(out_features, in_features)} but the model's is {shape}"
        )
    return _Entry(name, rank, method, in_features, out_features, entry["bias"]), module


def _check_spec(path: Path, spec: Mapping[str, Any], model: nn.Module) -> dict[str, tuple[_Entry, nn.Module]]:
    _check_keys(path, "the top-level object", spec, SPEC_KEYS)
    if spec["format"] != FORMAT:
        raise ValueError(f"{path} has format {_show(spec['format'])}; expected {FORMAT!r}")
    model_class = spec["model_class"]
    if model_class != type(model).__name__:
        raise ValueError(f"{path}: model_class is {_show(model_class)}; this model is a {type(model).__name__}")
    modules = spec["modules"]
    if not isinstance(modules, dict):
        raise ValueError(f"{path}: modules is {_show(modules)}; expected an object of module name -> entry")
    return {name: _check_entry(path, model, name, entry) for name, entry in modules.items()}


def _replacement(entry: _Entry, original: nn.Module) -> TruncatedLinear:
    weight = original.weight
    assert isinstance(weight, torch.Tensor)  # every module kind holds its weight as a tensor
    module = TruncatedLinear(
        entry.in_features, entry.out_features, entry.rank, bias=entry.bias, device=weight.device, dtype=weight.dtype
    )
    module.method = entry.method
    module.requires_grad_(weight.requires_grad)
    module.train(original.training)
    return module


# --- loading: the safetensors header against the model as rebuilt -----------------------------


def _shared_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names whose tensors share one storage (tied weights), as safetensors groups them."""
    groups: dict[tuple[torch.device, int, int], list[str]] = defaultdict(list)
    for key, tensor in state.items():
        storage = tensor.untyped_storage()
        if storage.data_ptr() != 0 and storage.nbytes() != 0:
            groups[(tensor.device, storage.data_ptr(), storage.nbytes())].append(key)
    return [names for names in groups.values() if len(names) > 1]


def _covers_storage(tensor: torch.Tensor) -> bool:
    storage = tensor.untyped_storage()
    return tensor.data_ptr() == storage.data_ptr() and tensor.numel() * tensor.element_size() == storage.nbytes()


def _describe(shape: Shape, dtype: torch.dtype) -> str:
    return f"shape {list(shape)} {_DTYPE_NAMES.get(dtype, str(dtype))}"


def _read_header(path: Path) -> dict[str, tuple[Shape, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; save with fasttrunc.save_truncated first")
    try:
        with safe_open(str(path), "pt") as f:
            return {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for every kind of bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not a readable safetensors file ({reason})") from None


def _check_header(
    path: Path,
    header: Mapping[str, tuple[Shape, str]],
    expected: Mapping[str, tuple[Shape, torch.dtype]],
    groups: Sequence[Sequence[str]],
    complete: set[str],
) -> list[str]:
    """The keys to load from the file; a one-line ValueError on the first problem found."""
    problems: list[str] = []
    required = set(expected)
    for group in groups:
        present = [key for key in group if key in header]
        required.difference_update(group)
        whole = sorted(key for key in group if key in complete)
        if len(present) == 1 and present[0] in whole:
            required.add(present[0])
        elif not present:
            name = whole[0] if whole else sorted(group)[0]
            problems.append(
                f"tensor {name!r} is missing; the model ties {', '.join(sorted(group))} and expects one of them "
                f"with {_describe(*expected[name])}"
            )
        else:
            problems.append(
                f"tensors {', '.join(sorted(present))} are tied in the model; expected exactly one of "
                f"{', '.join(whole) or 'none (no name covers the whole storage)'}"
            )
    shared = {key for group in groups for key in group}
    for key in sorted(required):
        if key not in header:
            problems.append(f"tensor {key!r} is missing; the model as rebuilt expects {_describe(*expected[key])}")
    for key in sorted(header):
        if key not in expected:
            problems.append(f"tensor {key!r} is not in the model as rebuilt")
        elif key in required or key not in shared:
            shape, dtype = header[key]
            want_shape, want_dtype = expected[key]
            if shape != want_shape or dtype != _DTYPE_NAMES.get(want_dtype):
                problems.append(
                    f"tensor {key!r} has shape {list(shape)} {dtype}; the model as rebuilt expects "
                    f"{_describe(want_shape, want_dtype)}"
                )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{path}: {problems[0]}{more}")
    return sorted(required)


def _read_tensors(path: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), "pt") as f:
            return {key: f.get_tensor(key) for key in keys}
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: cannot read the tensors ({reason})") from None


def _copy(destination: torch.Tensor, source: torch.Tensor) -> None:
    destination.copy_(source)


# --- loading -----------------------------------------------------------------------------------


def load_truncated(model: nn.Module, directory: str | os.PathLike[str]) -> Truncation:
    """Rebuild the saved swaps on ``model`` (a fresh, untruncated one) and load the saved weights.

    All or nothing: ``truncation.json`` (its JSON, every key and type, ranks within each module's
    range, methods from ``"exact"``, ``"randomized"`` or null, module names that exist in
    ``model`` as ``nn.Linear``/``Conv1D`` of the recorded shape) and the safetensors header
    (every name, shape and dtype, against the state dict ``model`` will have once rebuilt, tied
    weights saved once) are checked before anything changes. Any mismatch is a one-line
    ``ValueError`` naming the file, the entry and what was expected; a missing directory or file is
    a ``FileNotFoundError``. Should loading fail after the checks, every tensor is put back and the
    swaps undone, so ``model`` is byte-identical to before. Returns the :class:`Truncation`.
    """
    _check_model(model, "load_truncated")
    directory = _check_directory(directory, "load_truncated")
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} does not exist; save with fasttrunc.save_truncated first")
    state = _check_materialized(model, "load_truncated")
    checked = _check_spec(spec_path, _read_spec(spec_path), model)
    originals = {name: module for name, (_, module) in checked.items()}
    replacements = {name: _replacement(entry, originals[name]) for name, (entry, _) in checked.items()}

    # The state dict as rebuilt: the swapped modules' entries give way to their replacements'.
    kept = dict(state)
    for name, module in originals.items():
        for key in module.state_dict():
            kept.pop(f"{name}.{key}", None)
    targets = dict(kept)
    for name, module in replacements.items():
        targets.update({f"{name}.{key}": tensor for key, tensor in module.state_dict().items()})
    expected = {key: (tuple(t.shape), t.dtype) for key, t in targets.items()}
    groups = _shared_groups(kept)
    complete = {key for group in groups for key in group if _covers_storage(kept[key])}
    keys = _check_header(weights_path, _read_header(weights_path), expected, groups, complete)
    loaded = _read_tensors(weights_path, keys)

    backups: dict[str, torch.Tensor] = {}
    swapped: list[str] = []
    try:
        with torch.no_grad():
            for key in keys:
                if key in kept:
                    backups[key] = targets[key].to("cpu", copy=True)
                _copy(targets[key], loaded.pop(key))
        swapped = list(replacements)
        return replace_modules_(model, replacements)
    except BaseException:
        with torch.no_grad():
            for key, old in backups.items():
                targets[key].copy_(old)
        for name in swapped:
            _set_submodule(model, name, originals[name])
        raise
