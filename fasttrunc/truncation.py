"""Swap chosen linears of a model for their rank-r truncations, in place and reversibly.

Selection is by regex on qualified module names, or by ``Targets(layers=..., matrices=...)``
resolved through :data:`FAMILIES`, a table with one row per model family. A new family is a new
row, not a new code path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fasttrunc.linear import TruncatedLinear
from fasttrunc.ranks import resolve_rank, validate_rank_spec
from fasttrunc.svd import check_method, truncated_svd

# Matrix aliases follow LASER; groups expand to the single aliases.
MATRIX_ALIASES = ("mlp_in", "mlp_out", "attn_qkv", "attn_out")
MATRIX_GROUPS = {"mlp": ("mlp_in", "mlp_out"), "attn": ("attn_qkv", "attn_out"), "all": MATRIX_ALIASES}


@dataclass(frozen=True)
class Family:
    """Where a family keeps its layers and, inside one layer, which linears each alias names."""

    name: str
    layer_containers: tuple[str, ...]  # tried in order: the ModuleList of blocks
    matrices: Mapping[str, tuple[str, ...]]  # alias -> names relative to one block


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt-neox",
        layer_containers=("gpt_neox.layers", "layers"),
        matrices={
            "mlp_in": ("mlp.dense_h_to_4h",),
            "mlp_out": ("mlp.dense_4h_to_h",),
            "attn_qkv": ("attention.query_key_value",),
            "attn_out": ("attention.dense",),
        },
    ),
    Family(
        name="toy-transformer",  # fasttrunc.models.toy: query is the identity, so qkv = key, value
        layer_containers=("blocks",),
        matrices={
            "mlp_in": ("ff.w1",),
            "mlp_out": ("ff.w2",),
            "attn_qkv": ("attn.wk", "attn.wv"),
            "attn_out": ("attn.wo",),
        },
    ),
)


@dataclass(frozen=True)
class Targets:
    """Layers (indices, negative from the end; None = every layer) x matrix aliases or groups."""

    layers: int | Sequence[int] | None = None
    matrices: str | Sequence[str] = "all"


TargetSpec = str | Sequence[str] | Targets


def _try_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def detect_family(model: nn.Module) -> tuple[Family, str, int]:
    """The family row that fits ``model``, the path of its layer list, and its number of layers."""
    for family in FAMILIES:
        for path in family.layer_containers:
            layers = _try_submodule(model, path)
            if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
                continue
            first = next(iter(family.matrices.values()))[0]
            if _try_submodule(layers[0], first) is not None:
                return family, path, len(layers)
    known = ", ".join(f.name for f in FAMILIES)
    raise ValueError(
        f"{type(model).__name__} matches no known model family ({known}); select linears with a regex instead"
    )


def expand_matrices(matrices: str | Sequence[str]) -> list[str]:
    names = [matrices] if isinstance(matrices, str) else list(matrices)
    if not names:
        raise ValueError("matrices is empty; give at least one alias")
    allowed = MATRIX_ALIASES + tuple(MATRIX_GROUPS)
    out: list[str] = []
    for name in names:
        if name not in allowed:
            raise ValueError(f"matrix {name!r} is not known; allowed: {', '.join(allowed)}")
        for alias in MATRIX_GROUPS.get(name, (name,)):
            if alias not in out:
                out.append(alias)
    return out


def _expand_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    items = [layers] if isinstance(layers, int) else list(layers)
    if not items:
        raise ValueError("layers is empty; give at least one layer index (or None for all)")
    out: list[int] = []
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(
                f"layer {layer!r} is out of range for a model with {n_layers} layers; "
                f"allowed: 0..{n_layers - 1} or -{n_layers}..-1"
            )
        index = layer % n_layers
        if index not in out:
            out.append(index)
    return out


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _describe(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def resolve_targets(model: nn.Module, targets: TargetSpec) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules that ``targets`` selects, in model order."""
    linears = _linear_names(model)
    if isinstance(targets, Targets):
        family, path, n_layers = detect_family(model)
        wanted = []
        for layer in _expand_layers(targets.layers, n_layers):
            for alias in expand_matrices(targets.matrices):
                wanted.extend(f"{path}.{layer}.{rel}" for rel in family.matrices[alias])
        linear_set = set(linears)
        missing = [name for name in wanted if name not in linear_set]
        if missing:
            truncated = [n for n in missing if isinstance(_try_submodule(model, n), TruncatedLinear)]
            if truncated:
                raise ValueError(f"already truncated (restore first): {_describe(truncated)}")
            raise ValueError(f"no nn.Linear at {_describe(missing)}; linears that exist: {_describe(linears)}")
        return wanted
    patterns = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, (list, tuple)) else None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"targets {targets!r} must be a regex, a list of regexes, or Targets(...)")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"targets regex {pattern!r} is invalid: {exc}") from None
    selected = [name for name in linears if any(c.fullmatch(name) for c in compiled)]
    if not selected:
        truncated = [
            name
            for name, module in model.named_modules()
            if isinstance(module, TruncatedLinear) and any(c.fullmatch(name) for c in compiled)
        ]
        if truncated:
            raise ValueError(f"already truncated (restore first): {_describe(truncated)}")
        raise ValueError(f"targets {patterns} match no nn.Linear; linears that exist: {_describe(linears)}")
    return selected


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class Truncation(Mapping[str, nn.Module]):
    """The swaps made in a model: name -> replacement module, with :meth:`restore`.

    The original modules are kept as they were (same objects, same tensors), so restoring gives
    back bit-identical outputs. Usable as a context manager that restores on exit.
    """

    def __init__(self, model: nn.Module, originals: dict[str, nn.Module], replacements: dict[str, nn.Module]):
        self._model = model
        self.originals = originals
        self._replacements = replacements
        self.restored = False

    def __getitem__(self, name: str) -> nn.Module:
        return self._replacements[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._replacements)

    def __len__(self) -> int:
        return len(self._replacements)

    def __repr__(self) -> str:
        state = "restored" if self.restored else "active"
        return f"Truncation({state}, {len(self)} modules: {_describe(list(self))})"

    def spec(self) -> dict[str, dict[str, object]]:
        """JSON-ready name -> {rank, method} of the truncated modules."""
        return {
            name: {"rank": getattr(m, "rank", None), "method": getattr(m, "method", None)}
            for name, m in self._replacements.items()
        }

    def restore(self) -> None:
        """Put the original modules back (a second call does nothing)."""
        if self.restored:
            return
        for name, replacement in self._replacements.items():
            if _try_submodule(self._model, name) is not replacement:
                raise RuntimeError(f"{name} was replaced again after truncation; cannot restore it safely")
        for name, original in self.originals.items():
            _set_submodule(self._model, name, original)
        self.restored = True

    def __enter__(self) -> Truncation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def replace_modules_(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Truncation:
    """Swap the modules named in ``replacements`` into ``model``; the low-level half of truncate_."""
    originals = {name: model.get_submodule(name) for name in replacements}
    for name, module in replacements.items():
        _set_submodule(model, name, module)
    return Truncation(model, originals, dict(replacements))


def truncate_(
    model: nn.Module,
    targets: TargetSpec,
    rank: int | float,
    method: str = "exact",
    **svd_options,
) -> Truncation:
    """Replace each selected ``nn.Linear`` by its rank-``rank`` ``TruncatedLinear``, in place.

    Every check (targets, rank for each shape, method) runs before the model is touched, so a
    bad call leaves the model as it was. Matrices of one shape, dtype and device are factorized
    in one batched SVD (the list form of ``truncated_svd``).
    """
    check_method(method)
    validate_rank_spec(rank)
    names = resolve_targets(model, targets)
    linears: dict[str, nn.Linear] = {name: model.get_submodule(name) for name in names}
    for linear in linears.values():
        resolve_rank(rank, linear.out_features, linear.in_features)
    replacements: dict[str, TruncatedLinear] = {}
    with torch.no_grad():
        # The list form factorizes all matrices of one shape, dtype and device in one batched call.
        weights = [linears[name].weight.detach() for name in names]
        factors = truncated_svd(weights, rank, method=method, **svd_options)
        for name, (u, s, vh) in zip(names, factors):
            bias = linears[name].bias
            replacements[name] = TruncatedLinear.from_svd(
                u,
                s,
                vh,
                bias=None if bias is None else bias.detach(),
                method=method,
                dtype=u.dtype,
            )
    for name, module in replacements.items():
        module.train(linears[name].training)
    return replace_modules_(model, replacements)
