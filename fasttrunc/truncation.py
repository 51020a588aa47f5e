"""Swap chosen linears of a model for their rank-r truncations, in place and reversibly.

Selection is by regex on qualified module names, a list of them, a callable ``(name, module) ->
bool``, or ``Targets(layers=..., matrices=...)`` resolved through the family rows of
:mod:`fasttrunc.families`. :func:`factorize` computes the SVDs once; :func:`truncate_` swaps in
any ranks up to what was factorized, so a sweep factorizes once and truncates many times through
the same function.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fasttrunc import checks
from fasttrunc.checks import show
from fasttrunc.families import detect_family, layer_aliases, module_kind, truncatable_names
from fasttrunc.linear import TruncatedLinear
from fasttrunc.ranks import Rank, resolve_rank, validate_rank_spec
from fasttrunc.svd import Triplets, check_method, group_matrices, truncated_svd


@dataclass(frozen=True)
class Targets:
    """Layers (indices, negative from the end; None = every layer) x matrix aliases or groups.

    Types are checked here; ranges and aliases against the model when the targets are resolved.
    Where only some layers hold an alias (a hybrid model's attention), a group gives each layer
    the members it holds (over every layer, skipping those with none), and an alias named alone
    must be in every layer selected (see :func:`fasttrunc.families.layer_aliases`).
    """

    layers: int | Sequence[int] | None = None
    matrices: str | Sequence[str] = "all"

    def __post_init__(self) -> None:
        layers = self.layers
        if layers is not None:
            items: list[object] = [layers] if not isinstance(layers, list | tuple | range) else list(layers)
            for layer in items:
                if not checks.is_int(layer):
                    raise ValueError(
                        f"layer {show(layer)} is not an integer; give layers as integer indices (negative count "
                        "from the end) or None"
                    )
            normalized = [checks.integer("layer", x) for x in items]
            object.__setattr__(self, "layers", normalized[0] if checks.is_int(layers) else normalized)
        matrices = self.matrices
        if isinstance(matrices, str):
            return
        if not isinstance(matrices, list | tuple) or not all(isinstance(m, str) for m in matrices):
            raise ValueError(f"matrices {show(matrices)} must be an alias, a group, or a list of them (strings)")
        object.__setattr__(self, "matrices", list(matrices))


Filter = Callable[[str, nn.Module], bool]
TargetSpec = str | Sequence[str] | Targets | Filter


def _try_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _expand_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    items = [layers] if isinstance(layers, int) else list(layers)
    if not items:
        raise ValueError("layers is empty; give at least one layer index (or None for all)")
    out: list[int] = []
    for layer in items:
        if not -n_layers <= layer < n_layers:
            raise ValueError(
                f"layer {layer!r} is out of range for a model with {n_layers} layers; "
                f"allowed: 0..{n_layers - 1} or -{n_layers}..-1"
            )
        index = layer % n_layers
        if index not in out:
            out.append(index)
    return out


def _describe(names: Sequence[object], limit: int = 12) -> str:
    shown = ", ".join(map(str, names[:limit]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return model


def _refuse_truncated(truncated: Sequence[str]) -> None:
    if truncated:
        raise ValueError(f"already truncated (restore first): {_describe(truncated)}")


ROOT_REFUSED = "the root module itself cannot be truncated in place; wrap it in a container module"


def resolve_targets(model: nn.Module, targets: TargetSpec) -> list[str]:
    """Qualified names of the modules that ``targets`` selects, in model order (Targets: layer order).

    Every selected module is of a supported kind (``nn.Linear``, ``Conv1D``); selecting one that
    is already a ``TruncatedLinear`` is an error naming it (restore first), whichever form the
    targets take; the root module itself cannot be swapped in place and is refused.
    """
    _check_model(model)
    linears = truncatable_names(model)
    if isinstance(targets, Targets):
        family, path, n_layers = detect_family(model)
        layers = _expand_layers(targets.layers, n_layers)
        wanted: list[str] = []
        for layer, aliases in layer_aliases(family, targets.matrices, layers, every_layer=targets.layers is None):
            for alias in aliases:
                wanted.extend(f"{path}.{layer}.{rel}" for rel in family.names_for(alias))
        wanted = list(dict.fromkeys(wanted))
        linear_set = set(linears)
        missing = [name for name in wanted if name not in linear_set]
        if missing:
            _refuse_truncated([n for n in missing if isinstance(_try_submodule(model, n), TruncatedLinear)])
            raise ValueError(f"no nn.Linear at {_describe(missing)}; linears that exist: {_describe(linears)}")
        return wanted
    if callable(targets) and not isinstance(targets, str):
        selected, truncated = [], []
        for name, module in model.named_modules():
            if not targets(name, module):
                continue
            if isinstance(module, TruncatedLinear):
                truncated.append(name)
            elif module_kind(module) is not None:
                selected.append(name)
        _refuse_truncated(truncated)
        if "" in selected:
            raise ValueError(f"targets select the root module; {ROOT_REFUSED}")
        if not selected:
            raise ValueError(f"the targets callable selects no nn.Linear; linears that exist: {_describe(linears)}")
        return selected
    if isinstance(targets, str):
        patterns = [targets]
    elif isinstance(targets, list | tuple) and targets and all(isinstance(p, str) for p in targets):
        patterns = list(targets)
    else:
        raise ValueError(
            f"targets {show(targets)} must be a regex, a list of regexes, a callable (name, module) -> bool, or "
            "Targets(...)"
        )
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"targets regex {pattern!r} is invalid: {exc}") from None
    named = [(name, module) for name, module in model.named_modules() if any(c.fullmatch(name) for c in compiled)]
    _refuse_truncated([name for name, module in named if isinstance(module, TruncatedLinear)])
    selected = [name for name, module in named if module_kind(module) is not None]
    if "" in selected:
        raise ValueError(f"targets {patterns} select the root module; {ROOT_REFUSED}")
    if not selected:
        raise ValueError(f"targets {patterns} match no nn.Linear; linears that exist: {_describe(linears)}")
    return selected


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class Factors(Mapping[str, Triplets]):
    """name -> ``(U, S, Vh)`` of that module's weight, in fp32 (fp64 for fp64 weights), descending.

    Each holds up to the rank it was factorized to (``max_ranks[name]``); slicing gives any smaller
    rank. ``svd_calls`` counts the batched SVDs that computed them (one per group of matrices with
    the same shape, dtype, device and rank).
    """

    def __init__(self, triplets: dict[str, Triplets], method: str, svd_calls: int):
        self._triplets = triplets
        self.method = method
        self.svd_calls = svd_calls

    def __getitem__(self, name: str) -> Triplets:
        return self._triplets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._triplets)

    def __len__(self) -> int:
        return len(self._triplets)

    @property
    def max_ranks(self) -> dict[str, int]:
        return {name: s.shape[-1] for name, (_, s, _) in self._triplets.items()}

    def __repr__(self) -> str:
        return f"Factors({len(self)} modules, method={self.method!r}, svd_calls={self.svd_calls})"


def _ranks_for(
    names: Sequence[str], rank: Rank | Mapping[str, Rank], shapes: Mapping[str, tuple[int, int]], what: str = "rank"
) -> dict[str, int]:
    """name -> absolute rank, every check done (a mapping must name exactly the selected modules).

    ``what`` is the argument's name in messages (``rank`` for truncate_, ``max_rank`` for factorize).
    """
    if isinstance(rank, Mapping):
        extra = [show(k) for k in rank if k not in shapes]
        if extra:
            raise ValueError(f"{what} names modules that the targets do not select: {_describe(extra)}")
        missing = [n for n in names if n not in rank]
        if missing:
            raise ValueError(f"{what} gives no rank for the selected modules {_describe(missing)}")
        return {name: resolve_rank(rank[name], *shapes[name], name=what) for name in names}
    validate_rank_spec(rank, what)
    return {name: resolve_rank(rank, *shapes[name], name=what) for name in names}


def _modules_of(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The selected modules, each checked to hold a finite floating-point weight (before any work)."""
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        kind = module_kind(module)
        assert kind is not None  # resolve_targets selected only supported kinds
        weight = kind.weight(module)
        if weight.device.type == "meta":
            raise ValueError(f"{name} is on the meta device and holds no weights; load the model's weights first")
        if not weight.is_floating_point():
            raise ValueError(f"the model's {name} has a {weight.dtype} weight; only floating-point weights truncate")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"the model's {name} has NaN or infinite weights; the SVD of a non-finite matrix is undefined"
            )
    return modules


def factorize(
    model: nn.Module,
    targets: TargetSpec,
    max_rank: Rank | Mapping[str, Rank],
    method: str = "exact",
    **svd_options: Any,
) -> Factors:
    """The top-``max_rank`` singular triplets of every selected matrix, for :func:`truncate_`.

    One batched :func:`fasttrunc.truncated_svd` per group of matrices with the same shape, dtype,
    device and rank; the factors are kept in fp32 (fp64 for fp64 weights), so slicing them for
    many ranks never compounds a low-precision rounding. The model is not changed.
    """
    check_method(method)
    names = resolve_targets(model, targets)
    modules = _modules_of(model, names)
    kinds = {name: module_kind(m) for name, m in modules.items()}
    shapes = {name: kinds[name].shape(m) for name, m in modules.items()}  # type: ignore[union-attr]
    ks = _ranks_for(names, max_rank, shapes, "max_rank")
    weights = [kinds[name].weight(modules[name]) for name in names]  # type: ignore[union-attr]
    with torch.no_grad():
        triplets = truncated_svd(
            weights, [ks[n] for n in names], method=method, dtype=_factor_dtype(weights), **svd_options
        )
    calls = len(group_matrices(weights, [ks[n] for n in names]))
    return Factors(dict(zip(names, triplets)), method, calls)  # type: ignore[arg-type]


def _factor_dtype(weights: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def _merged_weight(name: str, original: nn.Module, replacement: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense ``(out, in)`` weight and the bias that merging ``replacement`` writes into ``original``."""
    kind = module_kind(original)
    if kind is not None and isinstance(replacement, TruncatedLinear):
        return replacement.weight, replacement.bias
    if kind is not None and type(replacement) is type(original) and module_kind(replacement) is kind:
        if kind.shape(replacement) != kind.shape(original):
            raise ValueError(
                f"{name}: the replacement's weight is {kind.shape(replacement)}, the original's {kind.shape(original)}"
            )
        return kind.weight(replacement), kind.bias(replacement)
    raise ValueError(
        f"{name}: cannot merge a {type(replacement).__name__} into a {type(original).__name__}; "
        "mergeable replacements are TruncatedLinear and dense modules of the original's kind"
    )


class Truncation(Mapping[str, nn.Module]):
    """The swaps made in a model: name -> replacement module, with :meth:`restore` and :meth:`merge_`.

    The original modules are kept as they were (same objects, same tensors), so restoring gives
    back bit-identical outputs. Usable as a context manager that restores on exit.
    """

    def __init__(self, model: nn.Module, originals: dict[str, nn.Module], replacements: dict[str, nn.Module]):
        self._model = model
        self.originals = originals
        self._replacements = replacements
        self.restored = False
        self.merged = False

    def __getitem__(self, name: str) -> nn.Module:
        return self._replacements[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._replacements)

    def __len__(self) -> int:
        return len(self._replacements)

    def __repr__(self) -> str:
        state = "merged" if self.merged else "restored" if self.restored else "active"
        return f"Truncation({state}, {len(self)} modules: {_describe(list(self))})"

    def spec(self) -> dict[str, dict[str, object]]:
        """JSON-ready name -> {rank, method} of the truncated modules."""
        return {
            name: {"rank": getattr(m, "rank", None), "method": getattr(m, "method", None)}
            for name, m in self._replacements.items()
        }

    def _check_in_place(self) -> None:
        for name, replacement in self._replacements.items():
            if _try_submodule(self._model, name) is not replacement:
                raise RuntimeError(f"{name} was replaced again after truncation; cannot restore it safely")

    def restore(self) -> None:
        """Put the original modules back (a second call does nothing)."""
        if self.restored:
            return
        if self.merged:
            raise ValueError("this truncation was merged into the original modules; there is nothing to restore")
        self._check_in_place()
        for name, original in self.originals.items():
            _set_submodule(self._model, name, original)
        self.restored = True

    def merge_(self) -> nn.Module:
        """Write each replacement's weight, dense and in the original's dtype, into the original module.

        A ``TruncatedLinear`` gives its rank-r weight ``b @ a``; a dense replacement of the same
        module kind (the remove-top and magnitude edits of :mod:`fasttrunc.edits`) gives its own
        weight. The original modules go back into the model with their weights (and biases)
        overwritten, so the model is a plain one again (``save_pretrained`` gives a checkpoint that
        needs no fasttrunc), predicting what the edited model predicts. Every replacement is checked
        before any weight is written. Final: ``restore`` is refused afterwards.
        """
        if self.merged:
            raise ValueError("this truncation is already merged")
        if self.restored:
            raise ValueError("this truncation was restored; truncate again before merging")
        self._check_in_place()
        dense = {name: _merged_weight(name, self.originals[name], r) for name, r in self._replacements.items()}
        for name, (weight, bias) in dense.items():
            original = self.originals[name]
            kind = module_kind(original)
            assert kind is not None  # checked by _merged_weight
            kind.write_weight(original, weight.to(kind.parameter(original).dtype))
            original_bias = kind.bias(original)
            if original_bias is not None and bias is not None:
                with torch.no_grad():
                    original_bias.copy_(bias)
        for name, original in self.originals.items():
            _set_submodule(self._model, name, original)
        self.merged = True
        return self._model

    def __enter__(self) -> Truncation:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.merged:
            self.restore()


def replace_modules_(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Truncation:
    """Swap the modules named in ``replacements`` into ``model``; the low-level half of truncate_."""
    _check_model(model)
    if "" in replacements:
        raise ValueError("the root module itself cannot be replaced in place")
    originals = {name: model.get_submodule(name) for name in replacements}
    for name, module in replacements.items():
        _set_submodule(model, name, module)
    return Truncation(model, originals, dict(replacements))


def _from_factors(module: nn.Module, triplets: Triplets, k: int, method: str) -> TruncatedLinear:
    kind = module_kind(module)
    assert kind is not None  # resolve_targets selected only supported kinds
    u, s, vh = triplets
    bias = kind.bias(module)
    weight = kind.parameter(module)
    replacement = TruncatedLinear.from_svd(
        u[:, :k],
        s[:k],
        vh[:k],
        bias=None if bias is None else bias.detach(),
        method=method,
        dtype=weight.dtype,
        requires_grad=weight.requires_grad,
    )
    replacement.train(module.training)
    return replacement


def truncate_(
    model: nn.Module,
    targets: TargetSpec,
    rank: Rank | Mapping[str, Rank],
    method: str = "exact",
    factors: Factors | None = None,
    **svd_options: Any,
) -> Truncation:
    """Replace each selected module by its rank-``rank`` ``TruncatedLinear``, in place.

    ``rank`` is one rank (int: absolute; float in [0, 1]: LASER's rho) or a mapping module name ->
    rank naming exactly the selected modules. With ``factors`` (from :func:`factorize`) no SVD
    runs: each module's factors are sliced to its rank. Every check (targets, ranks, method,
    factors) runs before the model is touched, so a bad call leaves the model as it was. The
    factors and bias keep the source's dtype, device and ``requires_grad``.
    """
    check_method(method)
    if not isinstance(rank, Mapping):
        validate_rank_spec(rank)
    names = resolve_targets(model, targets)
    modules = _modules_of(model, names)
    shapes = {name: module_kind(m).shape(m) for name, m in modules.items()}  # type: ignore[union-attr]
    ks = _ranks_for(names, rank, shapes)
    if factors is None:
        chosen = set(names)
        factors = factorize(model, lambda name, _: name in chosen, ks, method=method, **svd_options)
    else:
        if not isinstance(factors, Factors):
            raise TypeError(f"factors must come from fasttrunc.factorize; got {type(factors).__name__}")
        if factors.method != method:
            raise ValueError(f"factors were computed with method {factors.method!r}, not {method!r}")
        if svd_options:
            raise ValueError(f"SVD options {sorted(svd_options)} have no effect with precomputed factors")
        for name in names:
            if name not in factors:
                raise ValueError(f"factors hold no SVD of {name}; factorize it first")
            u, s, vh = factors[name]
            if (u.shape[0], vh.shape[1]) != shapes[name]:
                raise ValueError(f"factors of {name} are for a {u.shape[0]}x{vh.shape[1]} matrix, not {shapes[name]}")
            if ks[name] > s.shape[-1]:
                raise ValueError(
                    f"rank {ks[name]} for {name} exceeds the {s.shape[-1]} components factorized; "
                    f"the factors must come from factorize with max_rank >= {ks[name]}"
                )
    with torch.no_grad():
        replacements = {name: _from_factors(modules[name], factors[name], ks[name], method) for name in names}
    return replace_modules_(model, replacements)


__all__ = [
    "Factors",
    "Targets",
    "TargetSpec",
    "Truncation",
    "factorize",
    "replace_modules_",
    "resolve_targets",
    "truncate_",
]
