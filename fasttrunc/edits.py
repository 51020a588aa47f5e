"""Edit kinds beside LASER's keep-top-k, and edit lists (``edits.json``) that compose several edits.

Kinds, for a module of weight ``W`` (out x in) and a rank ``k`` (fasttrunc's rank rules):

- ``keep-top``: LASER's intervention, ``W_k = U_k S_k Vh_k``, as a ``TruncatedLinear``
  (exactly what :func:`fasttrunc.truncate_` does);
- ``remove-top``: ``W - W_k``, the weight without its top-k components, as a dense module;
- ``magnitude``: the ``k * (in + out)`` entries of largest ``|w|`` kept, the rest zeroed, as a
  dense module: as many parameters as a rank-k factorization (LASER's "dropout"-style baseline).
  Ties at the threshold are broken by ``torch.topk`` (exactly that many entries are kept).

The dense kinds are swapped in through :func:`fasttrunc.replace_modules_` as new modules (deep
copies whose weight is written): the original modules and their tensors are never changed, so
``restore()`` gives the model back bit-identically, as it does for keep-top.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fasttrunc import checks
from fasttrunc.families import module_kind
from fasttrunc.ranks import Rank, resolve_rank, validate_rank_spec
from fasttrunc.runs import atomic_write_text
from fasttrunc.truncation import (
    Factors,
    TargetSpec,
    Truncation,
    factorize,
    replace_modules_,
    resolve_targets,
    truncate_,
)

EDIT_KINDS = ("keep-top", "remove-top", "magnitude")


def _only(names: Sequence[str]):
    chosen = set(names)
    return lambda name, _module: name in chosen


def _ranks(model: nn.Module, names: Sequence[str], rank: Rank | Mapping[str, Rank]) -> dict[str, int]:
    out = {}
    for name in names:
        module = model.get_submodule(name)
        kind = module_kind(module)
        assert kind is not None  # resolve_targets selects only supported kinds
        given = rank[name] if isinstance(rank, Mapping) else rank
        out[name] = resolve_rank(given, *kind.shape(module))
    return out


def dense_replacement(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of ``module`` whose weight is ``weight`` (out x in), in the module's layout and dtype."""
    kind = module_kind(module)
    assert kind is not None
    replacement = copy.deepcopy(module)
    kind.write_weight(replacement, weight.to(kind.weight(module).dtype))
    return replacement


def remove_top_weight(weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> torch.Tensor:
    """``W - U_k diag(S_k) Vh_k``, computed in the factors' dtype."""
    top = (u[:, :k] * s[:k]) @ vh[:k]
    return weight.to(top.dtype) - top


def magnitude_weight(weight: torch.Tensor, k: int) -> torch.Tensor:
    """``W`` with all but its ``k * (in + out)`` largest-magnitude entries zeroed."""
    out_features, in_features = weight.shape
    keep = min(k * (out_features + in_features), weight.numel())
    flat = torch.zeros_like(weight).reshape(-1)
    if keep:
        index = weight.abs().reshape(-1).topk(keep).indices
        flat[index] = weight.reshape(-1)[index]
    return flat.reshape(weight.shape)


def apply_edit(
    model: nn.Module,
    targets: TargetSpec,
    kind: str,
    rank: Rank | Mapping[str, Rank],
    factors: Factors | None = None,
    method: str = "exact",
) -> Truncation:
    """Apply edit ``kind`` at ``rank`` (one rank, or name -> rank) to every selected module; restorable.

    ``factors`` (from :func:`fasttrunc.factorize`) skip the SVD for keep-top and remove-top; every
    check runs before the model is touched.
    """
    checks.choice("kind", kind, EDIT_KINDS)
    if kind == "keep-top":
        return truncate_(model, targets, rank, method=method, factors=factors)
    if not isinstance(rank, Mapping):
        validate_rank_spec(rank)
    names = resolve_targets(model, targets)
    ks = _ranks(model, names, rank)
    replacements: dict[str, nn.Module] = {}
    with torch.no_grad():
        if kind == "magnitude":
            for name in names:
                module = model.get_submodule(name)
                weight = module_kind(module).weight(module)  # type: ignore[union-attr]
                replacements[name] = dense_replacement(module, magnitude_weight(weight, ks[name]))
        else:
            if factors is None:
                factors = factorize(model, _only(names), ks, method=method)
            for name in names:
                if name not in factors or factors.max_ranks[name] < ks[name]:
                    raise ValueError(f"factors hold fewer than {ks[name]} components of {name}; factorize it first")
            for name in names:
                module = model.get_submodule(name)
                weight = module_kind(module).weight(module)  # type: ignore[union-attr]
                replacements[name] = dense_replacement(module, remove_top_weight(weight, *factors[name], ks[name]))
    return replace_modules_(model, replacements)


# --- edit lists ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One module edited: ``kind`` at ``rank`` (an int, or a float rho as LASER writes it)."""

    module: str
    rank: Rank
    kind: str = "keep-top"

    def __post_init__(self) -> None:
        checks.text("module", self.module)
        validate_rank_spec(self.rank)
        checks.choice("kind", self.kind, EDIT_KINDS)

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "rank": self.rank, "kind": self.kind}


def check_edits(edits: Sequence[Edit]) -> list[Edit]:
    """The edits as a list; a module edited twice is an error naming it."""
    seen: set[str] = set()
    for edit in edits:
        if not isinstance(edit, Edit):
            raise TypeError(f"edits must be Edit objects; got {type(edit).__name__}")
        if edit.module in seen:
            raise ValueError(f"module {edit.module} is edited twice; give each module one edit")
        seen.add(edit.module)
    return list(edits)


def apply_edits(
    model: nn.Module, edits: Sequence[Edit], factors: Factors | None = None, method: str = "exact"
) -> Truncation:
    """Apply a list of edits (of any kinds) as one restorable :class:`Truncation`.

    All keep-top edits go through one ``truncate_(model, names, {name: rank})``.
    """
    edits = check_edits(edits)
    if not edits:
        raise ValueError("no edits to apply")
    for edit in edits:
        try:
            module = model.get_submodule(edit.module)
        except AttributeError:
            raise ValueError(f"the model has no module {edit.module}") from None
        if module_kind(module) is None:
            raise ValueError(f"module {edit.module} is a {type(module).__name__}, which cannot be edited")
    by_kind: dict[str, dict[str, Rank]] = {}
    for edit in edits:
        by_kind.setdefault(edit.kind, {})[edit.module] = edit.rank
    done: list[Truncation] = []
    try:
        for kind, ranks in by_kind.items():
            done.append(apply_edit(model, _only(list(ranks)), kind, ranks, factors=factors, method=method))
    except Exception:
        for truncation in reversed(done):
            truncation.restore()
        raise
    originals = {name: m for t in done for name, m in t.originals.items()}
    replacements = {name: t[name] for t in done for name in t}
    return Truncation(model, originals, replacements)


def target_edits(model: nn.Module, targets: TargetSpec, rank: Rank, kind: str = "keep-top") -> list[Edit]:
    """One edit of ``kind`` at ``rank`` for every module ``targets`` selects (in model order)."""
    checks.choice("kind", kind, EDIT_KINDS)
    validate_rank_spec(rank)
    return [Edit(name, rank, kind) for name in resolve_targets(model, targets)]


def edit_spec(truncation: Truncation, edits: Sequence[Edit], method: str = "exact") -> dict[str, dict[str, Any]]:
    """JSON-ready name -> {rank (absolute), kind, method} of ``edits`` as ``truncation`` applied them.

    ``method`` is the SVD's; a magnitude edit runs none (None).
    """
    out: dict[str, dict[str, Any]] = {}
    for edit in edits:
        original = truncation.originals[edit.module]
        kind = module_kind(original)
        assert kind is not None  # apply_edits edits supported kinds only
        out[edit.module] = {
            "rank": resolve_rank(edit.rank, *kind.shape(original)),
            "kind": edit.kind,
            "method": None if edit.kind == "magnitude" else method,
        }
    return out


def save_edits(path: str | os.PathLike[str], edits: Sequence[Edit], **info: Any) -> Path:
    """Write ``{"edits": [...], **info}`` to ``path`` (atomically); ``info`` holds e.g. the scores."""
    body = {"edits": [e.to_dict() for e in check_edits(edits)], **info}
    return atomic_write_text(path, json.dumps(body, indent=2) + "\n")


def load_edits(path: str | os.PathLike[str]) -> list[Edit]:
    """The edits of an ``edits.json``, checked; problems are one line naming the file (and the entry)."""
    shown = str(path)
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{shown}: cannot read the edits file ({exc.strerror or type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{shown}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(body, dict) or not isinstance(body.get("edits"), list):
        raise ValueError(f'{shown}: expected {{"edits": [{{"module": ..., "rank": ..., "kind": ...}}, ...]}}')
    edits = []
    for i, entry in enumerate(body["edits"]):
        where = f"{shown}: edit {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object")
        unknown = sorted(set(entry) - {"module", "rank", "kind"})
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; allowed: module, rank, kind")
        missing = [k for k in ("module", "rank") if k not in entry]
        if missing:
            raise ValueError(f"{where} has no {' or '.join(missing)}")
        try:
            edits.append(Edit(entry["module"], entry["rank"], entry.get("kind", "keep-top")))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    try:
        return check_edits(edits)
    except ValueError as exc:
        raise ValueError(f"{shown}: {exc}") from None


__all__ = [
    "EDIT_KINDS",
    "Edit",
    "apply_edit",
    "apply_edits",
    "check_edits",
    "edit_spec",
    "load_edits",
    "magnitude_weight",
    "remove_top_weight",
    "save_edits",
    "target_edits",
]
