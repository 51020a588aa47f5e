"""Model family rows and module kinds: where a model keeps its blocks, and what each matrix alias names.

A *family row* says, for one kind of model, where its ``nn.ModuleList`` of blocks lives and which
linear modules inside one block each matrix alias names. A new family is a new row, not a new
code path. Rows are found from ``config.model_type`` first, then by structure.

A *module kind* is a class of module that holds one weight matrix fasttrunc can truncate:
``nn.Linear`` (and subclasses) and transformers' ``Conv1D`` (GPT-2; weight stored ``(in, out)``).
This module is the one place that knows how to read such a weight as ``(out, in)`` and write a
dense one back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

# --- matrix aliases ----------------------------------------------------------------------------

# LASER's names where LASER has them: mlp_in is LASER's fc_in (on gated MLPs the gate projection),
# mlp_up the up projection of gated MLPs, mlp_out fc_out; attn_qkv is all three attention input
# projections, fused or not.
MATRIX_ALIASES = ("mlp_in", "mlp_up", "mlp_out", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out")
MATRIX_GROUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp_in", "mlp_up", "mlp_out"),
    "attn": ("attn_qkv", "attn_out"),
    "all": ("mlp_in", "mlp_up", "mlp_out", "attn_qkv", "attn_out"),
}
# The attention parts that attn_qkv is made of, when a family keeps them apart.
QKV_PARTS = ("attn_q", "attn_k", "attn_v")


# --- module kinds ------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    # transformers is imported by whoever built the model; fasttrunc does not import it to check.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


@dataclass(frozen=True)
class ModuleKind:
    """How to read and write the one weight matrix of a kind of module, as ``(out, in)``."""

    name: str
    matches: Callable[[nn.Module], bool]
    transposed: bool  # True when the module stores its weight as (in, out)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight as an ``(out, in)`` tensor (a view; detached)."""
        w = module.weight.detach()
        return w.t() if self.transposed else w

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        rows, cols = module.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def write_weight(self, module: nn.Module, dense: torch.Tensor) -> None:
        """Copy a dense ``(out, in)`` weight into ``module``, in the module's own layout and dtype."""
        with torch.no_grad():
            module.weight.copy_(dense.t() if self.transposed else dense)


LINEAR = ModuleKind("nn.Linear", lambda m: isinstance(m, nn.Linear), transposed=False)
CONV1D = ModuleKind("Conv1D", _is_conv1d, transposed=True)
MODULE_KINDS: tuple[ModuleKind, ...] = (LINEAR, CONV1D)


def module_kind(module: object) -> ModuleKind | None:
    """The kind of ``module``, or None when fasttrunc cannot truncate it."""
    if not isinstance(module, nn.Module):
        return None
    for kind in MODULE_KINDS:
        if kind.matches(module):
            return kind
    return None


def kind_names() -> str:
    return ", ".join(kind.name for kind in MODULE_KINDS)


def truncatable_names(model: nn.Module) -> list[str]:
    """Qualified names of every module of a supported kind, in model order."""
    return [name for name, module in model.named_modules() if module_kind(module) is not None]


# --- family rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Where a family keeps its blocks and, inside one block, which modules each alias names.

    ``matrices`` maps an alias to module names relative to one block. ``fused`` maps an alias
    that is part of a fused matrix to the alias that names the fused one (GPT-NeoX's ``attn_q``
    lives in ``attn_qkv``); ``unsupported`` maps an alias to why this family cannot truncate it.
    """

    name: str
    model_types: tuple[str, ...]
    layer_containers: tuple[str, ...]  # tried in order: the ModuleList of blocks
    matrices: Mapping[str, tuple[str, ...]]
    fused: Mapping[str, str] = field(default_factory=dict)
    unsupported: Mapping[str, str] = field(default_factory=dict)
    example: str = ""  # a hub id of this family, for the documentation

    def aliases(self) -> tuple[str, ...]:
        return tuple(a for a in MATRIX_ALIASES if a in self.matrices)

    def names_for(self, alias: str) -> tuple[str, ...]:
        """Module names (relative to one block) that ``alias`` names, or a one-line ValueError."""
        if alias in self.matrices:
            return self.matrices[alias]
        if alias in self.unsupported:
            raise ValueError(f"matrix {alias!r} cannot be truncated in {self.name}: {self.unsupported[alias]}")
        if alias in self.fused:
            raise ValueError(
                f"matrix {alias!r} is part of a fused matrix in {self.name}; truncate the whole of it with "
                f"{self.fused[alias]!r}"
            )
        raise ValueError(f"matrix {alias!r} does not exist in {self.name}; it has: {', '.join(self.aliases())}")


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt-neox",
        model_types=("gpt_neox",),
        layer_containers=("gpt_neox.layers", "layers"),
        matrices={
            "mlp_in": ("mlp.dense_h_to_4h",),
            "mlp_out": ("mlp.dense_4h_to_h",),
            "attn_qkv": ("attention.query_key_value",),
            "attn_out": ("attention.dense",),
        },
        fused={"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv"},
        example="EleutherAI/pythia-1b",
    ),
    Family(
        name="toy-transformer",  # fasttrunc.models.toy: the query is the identity, so qkv = key, value
        model_types=(),
        layer_containers=("blocks",),
        matrices={
            "mlp_in": ("ff.w1",),
            "mlp_out": ("ff.w2",),
            "attn_k": ("attn.wk",),
            "attn_v": ("attn.wv",),
            "attn_qkv": ("attn.wk", "attn.wv"),
            "attn_out": ("attn.wo",),
        },
        unsupported={"attn_q": "the toy transformer's query is the identity (it has no query matrix)"},
    ),
)


def _try_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) else None


def _layers_of(model: nn.Module, family: Family) -> tuple[str, int] | None:
    """``(path, n_layers)`` of the family's block list in ``model``, when its first block fits the row."""
    for path in family.layer_containers:
        layers = _try_submodule(model, path)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        first = next(iter(family.matrices.values()))[0]
        if _try_submodule(layers[0], first) is not None:
            return path, len(layers)
    return None


def detect_family(model: nn.Module) -> tuple[Family, str, int]:
    """The family row that fits ``model``, the path of its block list, and its number of blocks.

    By ``config.model_type`` first, then by structure (the first row whose block list and first
    alias are found). No fit is a one-line ValueError that lists the model's linears and says how
    to select them by regex or callable instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    model_type = _model_type(model)
    ordered = sorted(FAMILIES, key=lambda f: model_type not in f.model_types)
    for family in ordered:
        found = _layers_of(model, family)
        if found is not None:
            return family, found[0], found[1]
    known = ", ".join(f.name for f in FAMILIES)
    linears = truncatable_names(model)
    shown = ", ".join(linears[:8]) + (f", ... ({len(linears)} in all)" if len(linears) > 8 else "")
    raise ValueError(
        f"{type(model).__name__} (model_type {model_type!r}) matches no known model family ({known}); "
        f"select its linears by regex or by a callable (name, module) -> bool instead: {shown or 'it has none'}"
    )


def expand_matrices(matrices: str | Sequence[str], family: Family | None = None) -> list[str]:
    """Single aliases from aliases and groups, in order, without repeats.

    With ``family``, a group expands to the members the family has (``mlp`` on GPT-NeoX is
    ``mlp_in, mlp_out``), and a single alias the family lacks is a ValueError naming what it has.
    """
    if isinstance(matrices, str):
        names = [matrices]
    elif isinstance(matrices, Sequence) and all(isinstance(m, str) for m in matrices):
        names = list(matrices)
    else:
        raise ValueError(f"matrices {matrices!r} must be an alias, a group, or a list of them")
    if not names:
        raise ValueError("matrices is empty; give at least one alias")
    allowed = MATRIX_ALIASES + tuple(MATRIX_GROUPS)
    out: list[str] = []
    for name in names:
        if name not in allowed:
            here = allowed if family is None else family.aliases() + tuple(MATRIX_GROUPS)
            raise ValueError(f"matrix {name!r} is not known; allowed: {', '.join(here)}")
        if name in MATRIX_GROUPS:
            members = [a for a in MATRIX_GROUPS[name] if family is None or a in family.matrices]
        else:
            if family is not None:
                family.names_for(name)  # raises for an alias the family lacks
            members = [name]
        out.extend(a for a in members if a not in out)
    return out
