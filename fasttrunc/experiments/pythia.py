"""Pythia (or any GPT-NeoX) on IOI / factual recall: baseline vs one truncation, along revisions.

The paper's section 1c: late MLP matrices hold the global association "-> the"; truncating them
lets the in-context (IOI) or factual answer win. ``run`` loads each revision, scores the prompts,
truncates the chosen matrices, scores again and restores.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrunc import checks
from fasttrunc.families import expand_matrices
from fasttrunc.hub import REVISIONS_DIR, load_model
from fasttrunc.ranks import validate_rank_spec
from fasttrunc.runs import Progress, ResultMixin, parse_dtype, report, resolve_device
from fasttrunc.svd import check_method
from fasttrunc.tasks.metrics import (
    DEFAULT_BATCH_SIZE,
    Prompt,
    PromptMetrics,
    TaskMetrics,
    aggregate,
    encode_prompts,
    score,
)
from fasttrunc.truncation import Targets, truncate_

TASKS = ("ioi", "factual")
# IOI prompts by default: the paper's and LASER's evaluation sets are a few hundred prompts;
# 200 keeps the standard error of a mean probability near 0.02.
DEFAULT_IOI_PROMPTS = 200


# ``revisions=("all",)``: every checkpoint saved under a local model directory (DIR/revisions/).
ALL_REVISIONS = "all"


def _step_order(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"step(\d+)", name)
    return (int(match.group(1)), "") if match else (2**62, name)


def local_revisions(model: str) -> tuple[str, ...]:
    """The checkpoints under a local model directory's ``revisions/``, in training order (``stepN`` by N).

    A model that is not a local directory, or one without checkpoints, is a ValueError.
    """
    root = Path(model).expanduser() / REVISIONS_DIR
    if not Path(model).expanduser().is_dir():
        raise ValueError(f"revisions {ALL_REVISIONS!r} needs a local model directory; {model} is not one")
    found = sorted((p.name for p in root.glob("*") if p.is_dir()), key=_step_order) if root.is_dir() else []
    if not found:
        raise ValueError(
            f"model directory {model} holds no checkpoints under {REVISIONS_DIR}/ for revisions {ALL_REVISIONS!r}; "
            "save some with make-tiny-neox --checkpoints"
        )
    return tuple(found)


def resolve_revisions(model: str, revisions: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """``revisions`` with ``"all"`` (alone) expanded by :func:`local_revisions`."""
    if ALL_REVISIONS in revisions:
        if len(revisions) != 1:
            raise ValueError(f"revisions {ALL_REVISIONS!r} stands alone; got {', '.join(map(str, revisions))}")
        return local_revisions(model)
    return revisions


def check_task(task: object) -> str:
    return checks.choice("task", task, TASKS)


def task_prompts(task: str, tokenizer: Any, n: int | None, seed: int) -> list[Prompt]:
    """``n`` prompts of ``task`` (IOI: 200 by default; factual: every usable fact by default)."""
    check_task(task)
    if task == "ioi":
        from fasttrunc.tasks.ioi import build_ioi_prompts

        return build_ioi_prompts(tokenizer, DEFAULT_IOI_PROMPTS if n is None else n, seed)
    from fasttrunc.tasks.factual import build_factual_prompts

    return build_factual_prompts(tokenizer, n, seed)


def _freeze(config: object, name: str, value: object) -> None:
    """Set a field of a frozen config to its canonical form (tuples for sequences, as given in JSON)."""
    object.__setattr__(config, name, value)


@dataclass(frozen=True, kw_only=True)
class ModelRunSettings:
    """What every Pythia experiment takes besides its own grid: where, which prompts, how.

    Checked on construction, before any model is loaded.
    """

    revisions: tuple[str | None, ...] = (None,)
    n: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE
    method: str = "exact"

    def __post_init__(self) -> None:
        revisions = checks.non_empty("revisions", self.revisions)
        for revision in revisions:
            if revision is not None:
                checks.text("revision", revision)
        _freeze(self, "revisions", tuple(revisions))
        if self.n is not None:
            checks.positive("n", self.n)
        checks.seed("seed", self.seed)
        checks.positive("batch_size", self.batch_size)
        resolve_device(self.device)
        parse_dtype(self.dtype)
        check_method(self.method)


@dataclass(frozen=True, kw_only=True)
class PythiaConfig(ModelRunSettings):
    model: str
    layers: tuple[int, ...]
    matrices: tuple[str, ...]
    rank: int | float
    task: str = "ioi"

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.text("model", self.model)
        layers = [checks.integer("layer", layer) for layer in checks.non_empty("layers", self.layers)]
        _freeze(self, "layers", tuple(layers))
        matrices = [self.matrices] if isinstance(self.matrices, str) else self.matrices
        expand_matrices(matrices)
        _freeze(self, "matrices", tuple(matrices))
        validate_rank_spec(self.rank)
        check_task(self.task)


@dataclass(frozen=True)
class PromptScore:
    """One prompt and its metrics before and after the truncation."""

    text: str
    answer: str
    subject: str | None
    baseline: PromptMetrics
    truncated: PromptMetrics


@dataclass
class RevisionResult:
    revision: str | None
    baseline: TaskMetrics
    truncated: TaskMetrics
    modules: dict[str, dict[str, Any]]  # truncated module -> rank, method (Truncation.spec())
    # truncated / baseline, for each of the two ratio aggregates
    gain_mean_of_ratios: float
    gain_ratio_of_means: float
    prompts: list[PromptScore] = field(default_factory=list)


@dataclass
class PythiaResult(ResultMixin):
    config: PythiaConfig
    n_prompts: int
    revisions: list[RevisionResult]
    seconds: float


def _gain(after: float, before: float) -> float:
    return after / before if before > 0 else float("inf")


def run(config: PythiaConfig, progress: Progress = None) -> PythiaResult:
    """For each revision: load, score the prompts, truncate through ``truncate_``, score again, restore."""
    start = time.perf_counter()
    results: list[RevisionResult] = []
    n_prompts = 0
    revisions = resolve_revisions(config.model, config.revisions)
    total = len(revisions)
    for i, revision in enumerate(revisions):
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
                    PromptScore(text=p.text, answer=p.answer, subject=p.subject, baseline=b, truncated=c)
                    for p, b, c in zip(prompts, base.per_prompt(), cut.per_prompt())
                ],
            )
        )
        del model
        report(progress, "pythia", i + 1, total, f"done {revision or 'default revision'}")
    return PythiaResult(config=config, n_prompts=n_prompts, revisions=results, seconds=time.perf_counter() - start)
