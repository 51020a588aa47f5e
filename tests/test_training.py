"""The one training loop: optimizer and schedule options, tracking, the checkpoint hook, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fasttrunc import training
from fasttrunc.training import WARMUP_DIVISOR, OptimConfig, lr_factor, train


def _regression(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g)
    model = nn.Linear(5, 1)
    return model, x, y


def _loss(model: nn.Linear, x: torch.Tensor, y: torch.Tensor):
    return lambda step: ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_every_optimizer_lowers_the_loss(name):
    model, x, y = _regression()
    history = train(model, _loss(model, x, y), steps=60, optim=OptimConfig(name=name, lr=0.05))
    assert len(history.losses) == 60
    first, last = history.loss_summary(window=5)
    assert last < 0.5 * first
    assert not model.training  # the loop leaves the model in eval mode


def test_warmup_cosine_schedule_reaches_the_optimizer(monkeypatch):
    steps = 200
    model, x, y = _regression()
    config = OptimConfig(name="adamw", lr=0.01, weight_decay=0.0, schedule="warmup_cosine", min_lr_ratio=0.1)
    made: list[torch.optim.Optimizer] = []
    real = training.make_optimizer

    def recording(params, cfg):
        made.append(real(params, cfg))
        return made[-1]

    monkeypatch.setattr(training, "make_optimizer", recording)

    def current_lr(step: int) -> float:
        return made[0].param_groups[0]["lr"]

    history = train(model, _loss(model, x, y), steps=steps, optim=config, track=current_lr, track_every=1)
    lrs = history.tracked  # lrs[i]: the rate after i optimizer steps, the one step i + 1 uses
    warmup = steps // WARMUP_DIVISOR
    factor = lr_factor(config, steps)
    assert lrs[0] == pytest.approx(0.01 / warmup)  # first step: 1/warmup of the peak
    assert lrs[warmup - 1] == pytest.approx(0.01)  # end of the warm-up: the peak
    assert lrs[steps] == pytest.approx(0.01 * factor(steps))
    assert factor(steps) == pytest.approx(0.1)  # cosine ends at min_lr_ratio of the peak
    assert all(a >= b - 1e-12 for a, b in zip(lrs[warmup - 1 : steps], lrs[warmup:steps]))  # decays


def test_constant_schedule_keeps_the_rate():
    factor = lr_factor(OptimConfig(), 100)
    assert {factor(s) for s in range(100)} == {1.0}


def test_tracking_steps_values_and_eval_mode():
    model, x, y = _regression()
    modes: list[bool] = []

    def track(step: int) -> tuple[int, float]:
        modes.append(model.training)
        assert not torch.is_grad_enabled()
        return step, float(model.weight.sum())

    history = train(model, _loss(model, x, y), steps=7, optim=OptimConfig(lr=0.01), track=track, track_every=3)
    assert history.track_steps == [0, 3, 6, 7]  # at init, every 3 steps and after the last
    assert [step for step, _ in history.tracked] == history.track_steps
    assert modes == [False] * 4
    assert history.tracked[0][1] != history.tracked[-1][1]  # it measured a model that changed


def test_save_hook_returns_where_it_saved():
    model, x, y = _regression()
    weights: dict[int, torch.Tensor] = {}

    def save(step: int) -> str:
        assert not model.training
        weights[step] = model.weight.detach().clone()
        return f"ckpt-{step}"

    history = train(model, _loss(model, x, y), steps=6, optim=OptimConfig(lr=0.05), save=save, save_at=(2, 6))
    assert history.saved == {2: "ckpt-2", 6: "ckpt-6"}
    assert not torch.equal(weights[2], weights[6])
    assert torch.equal(weights[6], model.weight.detach())  # the last checkpoint is the final model


def test_progress_reports_the_stage_and_the_loss():
    model, x, y = _regression()
    calls: list[tuple[str, int, int, str]] = []
    train(
        model,
        _loss(model, x, y),
        steps=4,
        optim=OptimConfig(lr=0.01),
        stage="fitting",
        progress=lambda *args: calls.append(args),
        progress_every=2,
    )
    assert [(stage, done, total) for stage, done, total, _ in calls] == [
        ("fitting", 0, 4),
        ("fitting", 2, 4),
        ("fitting", 4, 4),
    ]
    assert calls[-1][3].startswith("loss ")


def test_divergence_is_an_error_naming_the_step():
    model, x, y = _regression()
    with pytest.raises(RuntimeError, match="diverged: loss nan at step 2"):
        train(
            model,
            lambda step: model(x).sum() * (math.nan if step == 2 else 1.0),
            steps=5,
            optim=OptimConfig(lr=0.01),
        )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(name="lbfgs"), "optimizer 'lbfgs'"),
        (dict(lr=0.0), "lr 0.0"),
        (dict(lr=float("inf")), "lr inf"),
        (dict(momentum=1.0), "momentum 1.0"),
        (dict(weight_decay=-1.0), "weight_decay -1.0"),
        (dict(schedule="step"), "schedule 'step'"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio 2.0"),
    ],
)
def test_bad_optim_config_is_a_one_line_value_error(kwargs, words):
    with pytest.raises(ValueError) as err:
        OptimConfig(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(steps=0), "steps 0"),
        (dict(steps=3, track_every=4, track=lambda s: s), "track_every 4"),
        (dict(steps=3, track_every=1), "give both track and track_every"),
        (dict(steps=3, save_at=(4,), save=str), "save step 4"),
        (dict(steps=3, save_at=(1,)), "no save function"),
        (dict(steps=3, progress_every=0), "progress_every 0"),
    ],
)
def test_bad_train_arguments(kwargs, words):
    model, x, y = _regression()
    with pytest.raises(ValueError, match=words):
        train(model, _loss(model, x, y), optim=OptimConfig(), **kwargs)


def test_a_model_without_trainable_parameters_is_refused():
    model, x, y = _regression()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, _loss(model, x, y), steps=1, optim=OptimConfig())
