"""Pythia (or any GPT-NeoX) on IOI / factual recall: baseline vs one truncation, along revisions.

The paper's section 1c: late MLP matrices hold the global association "-> the"; truncating them
lets the in-context (IOI) or factual answer win. ``run`` loads each revision, scores the prompts,
truncates the chosen matrices, scores again and restores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fasttrunc.ranks import validate_rank_spec
from fasttrunc.runs import Progress, ResultMixin, report, resolve_device
from fasttrunc.svd import check_method
from fasttrunc.tasks.metrics import (
    DEFAULT_BATCH_SIZE,
    Prompt,
    TaskMetrics,
    aggregate,
    check_count,
    encode_prompts,
    score,
)
from fasttrunc.truncation import Targets, expand_matrices, truncate_

TASKS = ("ioi", "factual")
# IOI prompts by default: the paper's and LASER's evaluation sets are a few hundred prompts;
# 200 keeps the standard error of a mean probability near 0.02.
DEFAULT_IOI_PROMPTS = 200


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not known; allowed: {', '.join(TASKS)}")
    return task


def task_prompts(task: str, tokenizer, n: int | None, seed: int) -> list[Prompt]:
    """``n`` prompts of ``task`` (IOI: 200 by default; factual: every usable fact by default)."""
    check_task(task)
    if task == "ioi":
        from fasttrunc.tasks.ioi import build_ioi_prompts

        return build_ioi_prompts(tokenizer, DEFAULT_IOI_PROMPTS if n is None else n, seed)
    from fasttrunc.tasks.factual import build_factual_prompts

    return build_factual_prompts(tokenizer, n, seed)


@dataclass(kw_only=True)
class ModelRunSettings:
    """What every Pythia experiment takes besides its own grid: where, which prompts, how."""

    revisions: Sequence[str | None] = (None,)
    n: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE
    method: str = "exact"

    def check_settings(self) -> None:
        """Checks run before any model is loaded."""
        from fasttrunc.models.neox import parse_dtype

        if not self.revisions:
            raise ValueError("revisions is empty; give at least one (None: the default revision)")
        if self.n is not None:
            check_count("n", self.n)
        check_count("batch_size", self.batch_size)
        resolve_device(self.device)
        parse_dtype(self.dtype)
        check_method(self.method)


@dataclass
class PythiaConfig(ModelRunSettings):
    model: str
    layers: Sequence[int]
    matrices: Sequence[str]
    rank: int | float
    task: str = "ioi"


@dataclass
class RevisionResult:
    revision: str | None
    baseline: TaskMetrics
    truncated: TaskMetrics
    modules: dict[str, dict[str, Any]]  # truncated module -> rank, method
    # truncated / baseline, for each of the two ratio aggregates
    gain_mean_of_ratios: float
    gain_ratio_of_means: float
    prompts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PythiaResult(ResultMixin):
    config: PythiaConfig
    n_prompts: int
    revisions: list[RevisionResult]
    seconds: float


def _gain(after: float, before: float) -> float:
    return after / before if before > 0 else float("inf")


def run(config: PythiaConfig, progress: Progress = None) -> PythiaResult:
    from fasttrunc.models.neox import load_model

    check_task(config.task)
    config.check_settings()
    validate_rank_spec(config.rank)
    expand_matrices(config.matrices)
    if not config.layers:
        raise ValueError("layers is empty; give at least one layer index")
    start = time.perf_counter()
    results: list[RevisionResult] = []
    n_prompts = 0
    total = len(config.revisions)
    for i, revision in enumerate(config.revisions):
        report(progress, "pythia", i, total, f"loading {revision or 'default revision'}")
        model, tokenizer = load_model(config.model, revision, config.dtype, resolve_device(config.device))
        prompts = task_prompts(config.task, tokenizer, config.n, config.seed)
        encoded = encode_prompts(tokenizer, prompts)
        n_prompts = len(prompts)
        report(progress, "pythia", i, total, f"scoring {revision or 'default revision'}")
        base = score(model, encoded, config.batch_size)
        targets = Targets(layers=list(config.layers), matrices=list(config.matrices))
        with truncate_(model, targets, config.rank, method=config.method) as truncation:
            cut = score(model, encoded, config.batch_size)
            modules = truncation.spec()
        base_metrics, cut_metrics = aggregate(base), aggregate(cut)
        results.append(
            RevisionResult(
                revision=revision,
                baseline=base_metrics,
                truncated=cut_metrics,
                modules=modules,
                gain_mean_of_ratios=_gain(cut_metrics.mean_of_ratios, base_metrics.mean_of_ratios),
                gain_ratio_of_means=_gain(cut_metrics.ratio_of_means, base_metrics.ratio_of_means),
                prompts=[
                    {"text": p.text, "answer": p.answer, "subject": p.subject, "baseline": b, "truncated": c}
                    for p, b, c in zip(prompts, base.per_prompt(), cut.per_prompt())
                ],
            )
        )
        del model
        report(progress, "pythia", i + 1, total, f"done {revision or 'default revision'}")
    return PythiaResult(config=config, n_prompts=n_prompts, revisions=results, seconds=time.perf_counter() - start)
