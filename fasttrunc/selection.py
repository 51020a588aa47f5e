"""Choosing cells: selection rules, selection/report splits, several tasks at once, and greedy composition.

- **Rules.** Any metric of a metrics object can select (:data:`LOWER_IS_BETTER` names those where
  less is better; every other one is maximized). ``accuracy`` is LASER's rule: ties are broken by
  the lower ``log_loss`` where the metrics have one. :func:`selection_key` is a tuple that sorts
  the way the rule prefers (higher is better).
- **Several tasks** (``--select-tasks``): :data:`SELECT_TASKS_RULE`. Each task's score is made
  relative to that task's baseline (the unedited model), so tasks with different scales weigh
  the same, and the mean over tasks chooses; the tie-break is combined the same way.
- **Splits.** ``laser``: the first ``fraction`` of the examples in file order select, the rest
  report (LASER's); ``shuffled`` (the default): the same sizes after a seeded shuffle. Each side
  keeps file order. :class:`Split` records which, with its seed, for the result.
- **Composition** (``--compose greedy``): :func:`compose_greedy`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fasttrunc import checks
from fasttrunc.edits import Edit, apply_edits
from fasttrunc.rules import LOWER_IS_BETTER, RELATIVE_FLOOR, SELECT_TASKS_RULE, SPLIT_MODES, TIE_BREAK
from fasttrunc.truncation import Factors, Truncation

Score = float | tuple[float, ...]


def metric_value(metrics: Any, name: str) -> float:
    """``metrics.name`` (a dataclass or a mapping) as a float, or a one-line error naming what exists."""
    value = metrics.get(name) if isinstance(metrics, Mapping) else getattr(metrics, name, None)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        fields = metrics.keys() if isinstance(metrics, Mapping) else vars(metrics).keys()
        have = sorted(
            k for k in fields if isinstance(_get(metrics, k), int | float) and not isinstance(_get(metrics, k), bool)
        )
        raise ValueError(
            f"cannot select by {name!r}: these metrics give no number for it; numeric metrics: {', '.join(have)}"
        )
    return float(value)


def _get(metrics: Any, name: str) -> Any:
    return metrics.get(name) if isinstance(metrics, Mapping) else getattr(metrics, name, None)


def oriented(metrics: Any, name: str) -> float:
    """The metric with its sign set so that higher is better."""
    value = metric_value(metrics, name)
    return -value if name in LOWER_IS_BETTER else value


def selection_key(metrics: Any, select_by: str) -> tuple[float, ...]:
    """A key that sorts higher for the better cell: the metric, then its tie-break where it has one."""
    key = [oriented(metrics, select_by)]
    tie = TIE_BREAK.get(select_by)
    if tie is not None and _get(metrics, tie) is not None:
        key.append(oriented(metrics, tie))
    return tuple(key)


def best_index(candidates: Sequence[Any], select_by: str) -> int:
    """The index of the best candidate's metrics; ties go to the earliest (grid order)."""
    if not candidates:
        raise ValueError("no candidates to select from")
    keys = [selection_key(m, select_by) for m in candidates]
    return max(range(len(keys)), key=lambda i: keys[i])


def _relative(value: float, base: float) -> float:
    return (value - base) / max(abs(base), RELATIVE_FLOOR)


def combined_key(metrics: Mapping[str, Any], baseline: Mapping[str, Any], select_by: str) -> tuple[float, ...]:
    """:data:`SELECT_TASKS_RULE`: task -> metrics of one cell, scored against task -> baseline metrics."""
    if not metrics:
        raise ValueError("no tasks to combine")
    missing = [t for t in metrics if t not in baseline]
    if missing:
        raise ValueError(f"no baseline metrics for tasks {missing}")
    parts = [selection_key(metrics[t], select_by) for t in metrics]
    bases = [selection_key(baseline[t], select_by) for t in metrics]
    width = min(len(p) for p in parts + bases)
    return tuple(sum(_relative(p[j], b[j]) for p, b in zip(parts, bases)) / len(parts) for j in range(width))


# --- splits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Which examples select and which report; JSON-ready through :func:`fasttrunc.runs.jsonable`."""

    mode: str
    seed: int | None  # None for the laser split (no shuffle)
    fraction: float
    select: tuple[int, ...]
    report: tuple[int, ...]


def split_examples(n: int, fraction: float = 0.2, mode: str = "shuffled", seed: int = 0) -> Split:
    """The selection / report split of ``n`` examples: at least one on each side."""
    checks.choice("split", mode, SPLIT_MODES)
    checks.real("fraction", fraction, 0.0, 1.0, low_open=True, high_open=True)
    checks.seed("seed", seed)
    if checks.integer("n", n) < 2:
        raise ValueError(f"a split needs at least 2 examples (some select, some report); got {n}")
    k = min(n - 1, max(1, round(fraction * n)))
    order = list(range(n))
    if mode == "shuffled":
        random.Random(seed).shuffle(order)
    chosen = set(order[:k])
    return Split(
        mode=mode,
        seed=seed if mode == "shuffled" else None,
        fraction=float(fraction),
        select=tuple(i for i in range(n) if i in chosen),
        report=tuple(i for i in range(n) if i not in chosen),
    )


# --- greedy composition -------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One step the composition may take: the edits of one grid cell (a layer x matrix x rank)."""

    layer: int
    edits: tuple[Edit, ...]


@dataclass(frozen=True)
class Trial:
    layer: int
    edits: tuple[Edit, ...]
    score: Score
    accepted: bool


@dataclass
class Composition:
    """The accepted edits in order, the score after each accepted step, and every trial made."""

    edits: list[Edit]
    start_score: Score
    steps: list[tuple[tuple[Edit, ...], Score]] = field(default_factory=list)  # (edits added, score after)
    trials: list[Trial] = field(default_factory=list)
    order: str = "descending"

    @property
    def score(self) -> Score:
        return self.steps[-1][1] if self.steps else self.start_score


LAYER_ORDERS = ("descending", "ascending", "given")


def compose_greedy(
    evaluate: Callable[[Sequence[Edit]], Score],
    candidates: Sequence[Candidate],
    start: Sequence[Edit],
    start_score: Score | None = None,
    order: str = "descending",
    settle: Callable[[Sequence[Edit]], None] | None = None,
) -> Composition:
    """Greedy composition from ``start`` (the best single cell), one layer at a time.

    Layers are visited ``descending`` (last layer first, the default: LASER's gains sit in the
    later layers), ``ascending``, or in the ``given`` order of first appearance in ``candidates``.
    At each layer every candidate whose modules no accepted edit touches is evaluated on top of
    the accepted edits (``evaluate(accepted + candidate.edits)``, higher is better; a tuple
    compares lexicographically, as :func:`selection_key`); the best of them (ties: the first) is
    accepted only when its score is strictly higher than the current one. After each layer,
    ``settle(accepted)`` (e.g. :meth:`StackedEdits.sync`) puts the model back to exactly the
    accepted edits: a rejected step is then undone by restoring its truncation.
    """
    checks.choice("order", order, LAYER_ORDERS)
    accepted = list(start)
    current = evaluate(accepted) if start_score is None else start_score
    result = Composition(edits=[], start_score=current, order=order)
    layers = list(dict.fromkeys(c.layer for c in candidates))
    if order != "given":
        layers.sort(reverse=order == "descending")
    for layer in layers:
        touched = {e.module for e in accepted}
        options = [c for c in candidates if c.layer == layer and not touched & {e.module for e in c.edits}]
        if not options:
            continue
        scores = [evaluate(accepted + list(c.edits)) for c in options]
        best = max(range(len(scores)), key=lambda i: scores[i])
        take = scores[best] > current  # type: ignore[operator]
        for i, (c, s) in enumerate(zip(options, scores)):
            result.trials.append(Trial(layer=layer, edits=c.edits, score=s, accepted=take and i == best))
        if take:
            accepted += list(options[best].edits)
            current = scores[best]
            result.steps.append((options[best].edits, current))
        if settle is not None:
            settle(accepted)
    result.edits = accepted
    return result


class StackedEdits:
    """Applies edit lists to a model as a stack of restorable truncations, one per edit.

    ``sync(edits)`` restores (last first) the applied edits that are not a prefix of ``edits`` and
    applies the rest on top, so evaluating a candidate on top of accepted edits costs only the
    candidate's swap, and a rejected candidate is undone by restoring its :class:`Truncation`:
    the model is then bit-identical to before (no tensor is ever written in place).
    """

    def __init__(self, model: nn.Module, factors: Factors | None = None, method: str = "exact"):
        self.model = model
        self.factors = factors
        self.method = method
        self._stack: list[tuple[Edit, Truncation]] = []

    @property
    def applied(self) -> list[Edit]:
        return [edit for edit, _ in self._stack]

    def sync(self, edits: Sequence[Edit]) -> None:
        edits = list(edits)
        keep = 0
        while keep < min(len(edits), len(self._stack)) and self._stack[keep][0] == edits[keep]:
            keep += 1
        while len(self._stack) > keep:
            self._stack.pop()[1].restore()
        for edit in edits[keep:]:
            self._stack.append((edit, apply_edits(self.model, [edit], factors=self.factors, method=self.method)))

    def evaluator(self, score: Callable[[nn.Module], Score]) -> Callable[[Sequence[Edit]], Score]:
        """An ``evaluate(edits)`` for :func:`compose_greedy`: sync to ``edits``, then ``score(model)``."""

        def evaluate(edits: Sequence[Edit]) -> Score:
            self.sync(edits)
            return score(self.model)

        return evaluate

    def restore(self) -> None:
        """Undo every applied edit."""
        self.sync([])


__all__ = [
    "LOWER_IS_BETTER",
    "SELECT_TASKS_RULE",
    "Candidate",
    "Composition",
    "Split",
    "StackedEdits",
    "Trial",
    "best_index",
    "combined_key",
    "compose_greedy",
    "metric_value",
    "oriented",
    "selection_key",
    "split_examples",
]
