"""One training loop for every experiment: optimizer from a small config, progress, periodic tracking.

An experiment supplies ``loss_at(step) -> loss`` (it draws its own batch, seeded by the step if it
wants reproducibility) and, optionally, ``track(step) -> dict`` of measurements taken every
``track_every`` steps under ``torch.no_grad`` with the model in eval mode. The loop owns the
optimizer step, the loss log, the step axis and progress reports; it never prints or writes files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fasttrunc.runs import Progress, report

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimConfig:
    """Which optimizer and how it steps. ``momentum`` is SGD's; Adam uses its default betas."""

    name: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.name!r} is not known; allowed: {', '.join(OPTIMIZERS)}")
        for label, value, low in (("lr", self.lr, 0.0), ("weight_decay", self.weight_decay, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{label} {value!r} is not a finite number")
            if value < low or (label == "lr" and value == 0):
                raise ValueError(f"{label} {value!r} is out of range; allowed: {'> 0' if label == 'lr' else '>= 0'}")
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise ValueError(f"momentum {m!r} is outside [0, 1)")


def make_optimizer(params: Iterable[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class TrainHistory:
    """What a training run recorded: loss per step, and the tracked measurements with their steps.

    ``track_steps`` counts optimizer steps taken before the measurement (0 = at initialisation);
    it is strictly increasing. ``tracked[name]`` lines up with ``track_steps``.
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    track_steps: list[int] = field(default_factory=list)
    tracked: dict[str, list[float]] = field(default_factory=dict)

    def record(self, step: int, values: dict[str, float]) -> None:
        if self.track_steps and step <= self.track_steps[-1]:
            raise RuntimeError(f"tracking step {step} is not after {self.track_steps[-1]}")
        if self.track_steps and set(values) != set(self.tracked):
            raise RuntimeError(f"tracked keys changed at step {step}: {sorted(values)} vs {sorted(self.tracked)}")
        self.track_steps.append(step)
        for key, value in values.items():
            self.tracked.setdefault(key, []).append(float(value))


def check_steps(steps: int, track_every: int | None = None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps {steps!r} must be an integer >= 1")
    if track_every is not None and (
        isinstance(track_every, bool) or not isinstance(track_every, int) or not 1 <= track_every <= steps
    ):
        raise ValueError(
            f"track_every {track_every!r} must be an integer in [1, steps={steps}] (or None for no tracking)"
        )


def train(
    model: nn.Module,
    loss_at: Callable[[int], torch.Tensor],
    *,
    steps: int,
    optim: OptimConfig,
    progress: Progress = None,
    description: str = "training",
    track: Callable[[int], dict[str, float]] | None = None,
    track_every: int | None = None,
    progress_every: int = 1,
) -> TrainHistory:
    """Train ``model`` for ``steps`` optimizer steps on ``loss_at(step)``; return the history.

    With ``track`` and ``track_every``, ``track(step)`` runs at step 0, every ``track_every``
    steps and after the last step, under ``torch.no_grad`` in eval mode. A non-finite loss stops
    training with a RuntimeError naming the step (a diverged run is not a result).
    """
    check_steps(steps, track_every)
    if (track is None) != (track_every is None):
        raise ValueError("give both track and track_every, or neither")
    optimizer = make_optimizer(model.parameters(), optim)
    history = TrainHistory(steps=steps)

    def measure(step: int) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            values = track(step)
        model.train(was_training)
        history.record(step, values)

    model.train()
    if track is not None:
        measure(0)
    report(progress, description, 0, steps)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_at(step)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"training diverged: loss {value} at step {step}; lower the learning rate")
        history.losses.append(value)
        done = step + 1
        if track is not None and (done % track_every == 0 or done == steps):
            measure(done)
        if done % progress_every == 0 or done == steps:
            report(progress, description, done, steps)
    model.eval()
    return history


def summary(history: TrainHistory, window: int = 20) -> dict[str, Any]:
    """First and last loss, each averaged over ``window`` steps (single steps are noisy)."""
    losses = history.losses
    w = max(1, min(window, len(losses)))
    return {"loss_first": sum(losses[:w]) / w, "loss_last": sum(losses[-w:]) / w}
