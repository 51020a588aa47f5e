"""The one training loop: the recall toy, the associative memory and the tiny GPT-NeoX all train here.

A caller supplies ``loss_at(step) -> loss`` (it draws its own batch, seeded by the step if it
wants reproducibility) and, optionally:

- ``track(step) -> T``: a measurement taken at step 0, every ``track_every`` steps and after the
  last step, under ``torch.no_grad`` with the model in eval mode; the values come back in
  :attr:`TrainHistory.tracked` beside their steps;
- ``save(step) -> str``: called after the optimizer steps listed in ``save_at`` (a checkpoint),
  in eval mode; what it returns (where it saved) comes back in :attr:`TrainHistory.saved`.

The loop owns the optimizer (and its learning-rate schedule, see :class:`OptimConfig`), the
step, the loss log and progress reports; it never prints or writes files itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import nn

from fasttrunc import checks
from fasttrunc.runs import Progress, report

T = TypeVar("T")

OPTIMIZERS = ("sgd", "adam", "adamw")
# constant: lr throughout. warmup_cosine: linear warm-up over the first 1/WARMUP_DIVISOR of the
# steps, then cosine decay to min_lr_ratio x lr (the tiny GPT-NeoX's schedule, as Pythia's).
SCHEDULES = ("constant", "warmup_cosine")
WARMUP_DIVISOR = 20  # 5% of the steps: the tiny GPT-NeoX recipe was tuned with it


@dataclass(frozen=True)
class OptimConfig:
    """Which optimizer, how it steps and how its learning rate moves.

    ``momentum`` is SGD's; Adam and AdamW use their default betas. ``min_lr_ratio`` is where the
    ``warmup_cosine`` schedule ends, as a fraction of ``lr``.
    """

    name: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        checks.choice("optimizer", self.name, OPTIMIZERS)
        checks.real("lr", self.lr, 0.0, low_open=True)
        checks.real("momentum", self.momentum, 0.0, 1.0, high_open=True)
        checks.real("weight_decay", self.weight_decay, 0.0)
        checks.choice("schedule", self.schedule, SCHEDULES)
        checks.fraction("min_lr_ratio", self.min_lr_ratio)


def make_optimizer(params: Iterable[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over the parameters that require a gradient."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    if config.name == "sgd":
        return torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name == "adam":
        return torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config: OptimConfig, steps: int) -> Callable[[int], float]:
    """The multiplier of ``config.lr`` before optimizer step ``step`` (0-based) of a ``steps``-step run."""
    if config.schedule == "constant":
        return lambda step: 1.0
    warmup = max(1, steps // WARMUP_DIVISOR)
    low = config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


@dataclass
class TrainHistory(Generic[T]):
    """What a training run recorded.

    ``losses[i]``: the loss of optimizer step i. ``track_steps``: optimizer steps taken before each
    measurement (0 = at initialisation), strictly increasing; ``tracked[i]`` was taken at
    ``track_steps[i]``. ``saved``: step -> what ``save`` returned there.
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    track_steps: list[int] = field(default_factory=list)
    tracked: list[T] = field(default_factory=list)
    saved: dict[int, str] = field(default_factory=dict)

    def loss_summary(self, window: int = 20) -> tuple[float, float]:
        """First and last loss, each averaged over ``window`` steps (single steps are noisy)."""
        w = max(1, min(window, len(self.losses)))
        return sum(self.losses[:w]) / w, sum(self.losses[-w:]) / w


def check_steps(steps: object, track_every: object = None) -> int:
    """``steps`` as an int >= 1; ``track_every`` (when given) must lie in [1, steps]."""
    n = checks.positive("steps", steps)
    if track_every is not None:
        checks.integer("track_every", track_every, 1, n)
    return n


def train(
    model: nn.Module,
    loss_at: Callable[[int], torch.Tensor],
    *,
    steps: int,
    optim: OptimConfig,
    progress: Progress = None,
    stage: str = "training",
    track: Callable[[int], T] | None = None,
    track_every: int | None = None,
    save: Callable[[int], str] | None = None,
    save_at: Collection[int] = (),
    progress_every: int = 1,
) -> TrainHistory[T]:
    """Train ``model`` for ``steps`` optimizer steps on ``loss_at(step)``; return the history.

    Progress is reported under ``stage`` with the step's loss as its detail. A non-finite loss
    stops training with a RuntimeError naming the step (a diverged run is not a result).
    """
    check_steps(steps, track_every)
    checks.positive("progress_every", progress_every)
    if (track is None) != (track_every is None):
        raise ValueError("give both track and track_every, or neither")
    for step in save_at:
        checks.integer("save step", step, 1, steps)
    if save_at and save is None:
        raise ValueError("save_at lists steps but no save function was given")
    optimizer = make_optimizer(model.parameters(), optim)
    scheduler = (
        None if optim.schedule == "constant" else torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, steps))
    )
    history: TrainHistory[T] = TrainHistory(steps=steps)

    def in_eval(fn: Callable[[int], object], step: int) -> object:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            value = fn(step)
        model.train(was_training)
        return value

    def measure(step: int) -> None:
        assert track is not None
        history.track_steps.append(step)
        history.tracked.append(in_eval(track, step))  # type: ignore[arg-type]

    model.train()
    if track is not None:
        measure(0)
    report(progress, stage, 0, steps)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_at(step)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"training diverged: loss {value} at step {step}; lower the learning rate")
        history.losses.append(value)
        done = step + 1
        if track is not None and track_every is not None and (done % track_every == 0 or done == steps):
            measure(done)
        if save is not None and done in save_at:
            history.saved[done] = str(in_eval(save, done))
        if done % progress_every == 0 or done == steps:
            report(progress, stage, done, steps, f"loss {value:.3f}")
    model.eval()
    return history
