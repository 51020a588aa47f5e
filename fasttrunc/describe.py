"""See before you cut: the modules that ``Targets(layers, matrices)`` selects, by layer and alias.

:func:`describe_targets` takes a model, or a ``transformers`` config alone: the model is then
built on the meta device (no weights are allocated or loaded), which is enough to know its
module names and shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from fasttrunc.families import MATRIX_ALIASES, find_family, layer_aliases, layer_list, module_kind
from fasttrunc.truncation import Targets, resolve_targets


class TargetMatrix(NamedTuple):
    """One module an alias names: its qualified name and its weight's ``(out, in)`` shape."""

    name: str
    shape: tuple[int, int]


@dataclass(frozen=True)
class LayerTargets:
    """One block: alias -> the modules it names there, in the family row's order."""

    index: int
    matrices: Mapping[str, tuple[TargetMatrix, ...]]


@dataclass(frozen=True)
class TargetsDescription:
    """What :func:`describe_targets` found: the family row, its block list, and the selection."""

    family: str
    model_type: str | None
    model_class: str
    matched_by: str  # "model_type", "module names" or "row layout" (see fasttrunc.families.find_family)
    layers_path: str  # qualified name of the nn.ModuleList of blocks
    n_layers: int
    aliases: tuple[str, ...]  # every alias this family has
    fused: Mapping[str, str]  # alias -> the fused alias that holds it
    unsupported: Mapping[str, str]  # alias -> why this family cannot truncate it
    only_in: Mapping[str, tuple[int, ...]]  # alias -> the layers that hold it, where not every layer does
    layers: tuple[LayerTargets, ...]

    def names(self) -> list[str]:
        """Qualified names of the selected modules, in the order ``resolve_targets`` gives them."""
        names = (m.name for layer in self.layers for mats in layer.matrices.values() for m in mats)
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: shapes as ``[out, in]`` lists, layers as a list of objects."""
        return {
            "family": self.family,
            "model_type": self.model_type,
            "model_class": self.model_class,
            "matched_by": self.matched_by,
            "layers_path": self.layers_path,
            "n_layers": self.n_layers,
            "aliases": list(self.aliases),
            "fused": dict(self.fused),
            "unsupported": dict(self.unsupported),
            "only_in": {alias: list(layers) for alias, layers in self.only_in.items()},
            "layers": [
                {
                    "index": layer.index,
                    "matrices": {
                        alias: [{"name": m.name, "shape": list(m.shape)} for m in mats]
                        for alias, mats in layer.matrices.items()
                    },
                }
                for layer in self.layers
            ],
        }

    def format(self) -> str:
        """Plain text, one line per module: ``layer  alias  name  out x in``."""
        lines = [
            f"family {self.family} (model_type {self.model_type!r}, {self.model_class}; matched by {self.matched_by}): "
            f"{self.n_layers} layers in {self.layers_path}; aliases: {', '.join(self.aliases)}"
        ]
        rows = [
            (str(layer.index), alias, m.name, f"{m.shape[0]} x {m.shape[1]}")
            for layer in self.layers
            for alias, mats in layer.matrices.items()
            for m in mats
        ]
        header = ("layer", "alias", "module", "out x in")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])
        lines.extend(f"{alias}: part of {whole}" for alias, whole in self.fused.items())
        held: dict[tuple[int, ...], list[str]] = {}
        for alias, layers in self.only_in.items():
            held.setdefault(layers, []).append(alias)
        lines.extend(f"{', '.join(aliases)}: only in {layer_list(layers)}" for layers, aliases in held.items())
        reasons: dict[str, list[str]] = {}
        for alias, why in self.unsupported.items():
            reasons.setdefault(why, []).append(alias)
        lines.extend(f"{', '.join(aliases)}: not truncatable: {why}" for why, aliases in reasons.items())
        return "\n".join(lines)


def _meta_model(config: Any) -> nn.Module:
    """The causal LM of ``config``, built on the meta device: module names and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}) has no causal-LM class "
            f"in this transformers: {first}"
        ) from None


def _as_model(model_or_config: object) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        return _meta_model(model_or_config)
    raise TypeError(
        f"describe_targets needs a torch.nn.Module or a transformers PretrainedConfig; "
        f"got {type(model_or_config).__name__}"
    )


def describe_targets(
    model_or_config: nn.Module | Any,
    layers: int | Sequence[int] | None = None,
    matrices: str | Sequence[str] = "all",
) -> TargetsDescription:
    """The family found, its number of layers and, per selected layer, alias -> modules and shapes.

    ``layers`` and ``matrices`` are those of :class:`fasttrunc.Targets` and are checked the same
    way (an unknown alias names the family's aliases; a layer out of range names the range). A
    ``transformers.PretrainedConfig`` alone is enough: its model is built on the meta device.
    The model is not changed.
    """
    model = _as_model(model_or_config)
    targets = Targets(layers=layers, matrices=matrices)
    resolve_targets(model, targets)  # every check truncate_ would make, with the same messages
    match = find_family(model)
    family = match.family
    order = _layer_order(targets.layers, match.n_layers)
    described = [
        LayerTargets(
            index,
            {
                alias: tuple(
                    TargetMatrix(name, _shape(model, name))
                    for name in (f"{match.path}.{index}.{rel}" for rel in family.names_for(alias))
                )
                for alias in aliases
            },
        )
        for index, aliases in layer_aliases(family, targets.matrices, order, every_layer=targets.layers is None)
    ]
    return TargetsDescription(
        family=family.name,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        model_class=type(model).__name__,
        matched_by=match.matched_by,
        layers_path=match.path,
        n_layers=match.n_layers,
        aliases=family.aliases(),
        fused={a: family.fused[a] for a in MATRIX_ALIASES if a in family.fused},
        unsupported={a: family.unsupported[a] for a in MATRIX_ALIASES if a in family.unsupported},
        only_in={a: family.only_in[a][0] for a in MATRIX_ALIASES if a in family.only_in},
        layers=tuple(described),
    )


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    module = model.get_submodule(name)
    kind = module_kind(module)
    assert kind is not None  # resolve_targets selected only supported kinds
    return kind.shape(module)


def _layer_order(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    """Block indices in the order the targets give them (already checked by resolve_targets)."""
    items = range(n_layers) if layers is None else [layers] if isinstance(layers, int) else layers
    return list(dict.fromkeys(index % n_layers for index in items))


__all__ = ["LayerTargets", "TargetMatrix", "TargetsDescription", "describe_targets"]
