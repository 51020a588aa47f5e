"""Pythia (or any causal LM) on IOI / factual recall / task files: baseline vs one edit, along revisions.

The paper's section 1c: late MLP matrices hold the global association "-> the"; truncating them
lets the in-context (IOI) or factual answer win. ``run`` loads each revision, scores the prompts,
applies the edit (the chosen matrices at one rank and edit kind, or a saved edits.json), scores
again and restores. Task files (:mod:`fasttrunc.tasks.user`) are scored with LASER's metrics
(:mod:`fasttrunc.tasks.answers`); each result carries a reproducibility record
(:func:`fasttrunc.records.run_record`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fasttrunc import checks
from fasttrunc.edits import EDIT_KINDS, Edit, apply_edits, edit_spec, load_edits, target_edits
from fasttrunc.families import expand_matrices
from fasttrunc.hub import REVISIONS_DIR, load_model
from fasttrunc.ranks import validate_rank_spec
from fasttrunc.records import run_record
from fasttrunc.runs import Progress, ResultMixin, jsonable, parse_dtype, report, resolve_device
from fasttrunc.svd import check_method
from fasttrunc.tasks.answers import (
    AnswerMetrics,
    AnswerPrediction,
    aggregate_answers,
    encode_answers,
    predictions,
    score_answers,
)
from fasttrunc.tasks.metrics import (
    DEFAULT_BATCH_SIZE,
    Prompt,
    PromptMetrics,
    TaskMetrics,
    aggregate,
    encode_prompts,
    score,
)
from fasttrunc.tasks.user import TASK_SUFFIXES, TaskFile, is_task_file, load_task
from fasttrunc.truncation import Factors, Targets, factorize

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


def split_tasks(task: object) -> tuple[str, ...]:
    """The tasks of a ``task`` value: comma-separated, at most one of ioi / factual, any task files.

    A task file is a ``.jsonl`` or ``.csv`` path (:mod:`fasttrunc.tasks.user`); each is named by
    its file's stem in results, so two files may not share a stem.
    """
    text = checks.text("task", task)
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise ValueError(f"task {text!r} must be a comma-separated list with no empty items")
    for item in items:
        if not is_task_file(item) and item not in TASKS:
            raise ValueError(
                f"task {item!r} is not known; allowed: {', '.join(TASKS)}, or a task file ({', '.join(TASK_SUFFIXES)})"
            )
    builtin = [item for item in items if item in TASKS]
    if len(builtin) > 1:
        raise ValueError(f"task {text!r} names {len(builtin)} built-in tasks; give at most one of {', '.join(TASKS)}")
    stems = [Path(item).stem for item in items if is_task_file(item)]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ValueError(f"task {text!r} names two task files called {repeated[0]!r}; give each file once")
    return tuple(items)


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


EDITS_REPLACE = "edits {edits} replaces layers, matrices, rank and edit; give either edits or layers and rank"


@dataclass(frozen=True, kw_only=True)
class PythiaConfig(ModelRunSettings):
    """One edit measured on one or more tasks: ``layers`` x ``matrices`` at ``rank`` by ``edit``, or ``edits``.

    ``task`` is :func:`split_tasks`'s comma-separated list; ``edits`` an edits.json path
    (:func:`fasttrunc.edits.load_edits`), which replaces ``layers``, ``matrices``, ``rank`` and
    ``edit``. A task file with ``n`` contributes its first ``n`` examples (file order).
    """

    model: str
    layers: tuple[int, ...] = ()
    matrices: tuple[str, ...] = ("mlp_in",)
    rank: int | float | None = None
    task: str = "ioi"
    edit: str = "keep-top"
    edits: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.text("model", self.model)
        matrices = [self.matrices] if isinstance(self.matrices, str) else self.matrices
        expand_matrices(matrices)
        _freeze(self, "matrices", tuple(matrices))
        checks.choice("edit", self.edit, EDIT_KINDS)
        if self.edits is not None:
            checks.text("edits", self.edits)
            if self.layers or self.rank is not None or self.matrices != ("mlp_in",) or self.edit != "keep-top":
                raise ValueError(EDITS_REPLACE.format(edits=self.edits))
            load_edits(self.edits)
            _freeze(self, "layers", ())
        else:
            layers = [checks.integer("layer", layer) for layer in checks.non_empty("layers", self.layers)]
            _freeze(self, "layers", tuple(layers))
            if self.rank is None:
                raise ValueError("rank is missing; give a rank (an int, or a float rho in [0, 1]) or an edits file")
            validate_rank_spec(self.rank)
        for item in split_tasks(self.task):
            if is_task_file(item):
                load_task(item)

    @property
    def tasks(self) -> tuple[str, ...]:
        return split_tasks(self.task)

    @property
    def builtin_task(self) -> str | None:
        """ioi or factual when ``task`` names one, else None."""
        return next((item for item in self.tasks if not is_task_file(item)), None)

    @property
    def task_files(self) -> tuple[str, ...]:
        return tuple(item for item in self.tasks if is_task_file(item))

    def edit_label(self) -> str:
        """A few words on the edit, for titles: ``layers [10] mlp_in rank 0.05 keep-top`` or ``edits FILE``."""
        if self.edits is not None:
            return f"edits {self.edits}"
        return f"layers {list(self.layers)} {','.join(self.matrices)} rank {self.rank} {self.edit}"


@dataclass(frozen=True)
class PromptScore:
    """One prompt and its metrics before and after the truncation."""

    text: str
    answer: str
    subject: str | None
    baseline: PromptMetrics
    truncated: PromptMetrics


@dataclass
class AnswerTaskScore:
    """One task file in one revision: LASER's metrics before and after the edit, and per-example values."""

    task: str  # the file's stem
    path: str
    sha256: str
    n: int
    baseline: AnswerMetrics
    truncated: AnswerMetrics
    baseline_predictions: list[AnswerPrediction] = field(default_factory=list)
    truncated_predictions: list[AnswerPrediction] = field(default_factory=list)


@dataclass
class RevisionResult:
    revision: str | None
    # the built-in task's (ioi / factual) metrics; None when only task files were given
    baseline: TaskMetrics | None
    truncated: TaskMetrics | None
    modules: dict[str, dict[str, Any]]  # edited module -> rank (absolute), kind, method (edits.edit_spec)
    # truncated / baseline, for each of the two ratio aggregates (built-in task)
    gain_mean_of_ratios: float | None
    gain_ratio_of_means: float | None
    prompts: list[PromptScore] = field(default_factory=list)
    answers: list[AnswerTaskScore] = field(default_factory=list)  # one per task file, in --task order
    # records.run_record (model, tokenizer, task file hashes, split, SVD, versions) and the edits file's sha256
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class PythiaResult(ResultMixin):
    config: PythiaConfig
    n_prompts: int  # the built-in task's prompts (0 without one)
    revisions: list[RevisionResult]
    seconds: float


def _gain(after: float, before: float) -> float:
    return after / before if before > 0 else float("inf")


def config_edits(model: nn.Module, config: PythiaConfig) -> list[Edit]:
    """The edits ``config`` applies to ``model``: its edits file, or one edit per selected module."""
    if config.edits is not None:
        return load_edits(config.edits)
    assert config.rank is not None  # checked by the config
    targets = Targets(layers=list(config.layers), matrices=list(config.matrices))
    return target_edits(model, targets, config.rank, config.edit)


def svd_seed(config: ModelRunSettings) -> int | None:
    """The seed of the randomized SVD (the run's seed); None for the exact SVD, which draws nothing."""
    return config.seed if config.method == "randomized" else None


def _factors(model: nn.Module, edits: list[Edit], config: PythiaConfig) -> Factors | None:
    """The randomized SVD of the edited matrices from a generator seeded by :func:`svd_seed`, so reruns agree."""
    seed = svd_seed(config)
    ranks = {e.module: e.rank for e in edits if e.kind != "magnitude"}
    if seed is None or not ranks:
        return None
    generator = torch.Generator(device=resolve_device(config.device)).manual_seed(seed)
    return factorize(model, lambda name, _: name in ranks, ranks, method=config.method, generator=generator)


def _load_tasks(config: PythiaConfig) -> list[TaskFile]:
    files = [load_task(path) for path in config.task_files]
    if config.n is None:
        return files
    return [dataclasses.replace(f, examples=f.examples[: config.n]) for f in files]


def run(config: PythiaConfig, progress: Progress = None) -> PythiaResult:
    """For each revision: load, score every task, apply the edit, score again, restore."""
    start = time.perf_counter()
    results: list[RevisionResult] = []
    n_prompts = 0
    revisions = resolve_revisions(config.model, config.revisions)
    task_files = _load_tasks(config)
    edits_sha256 = None if config.edits is None else hashlib.sha256(Path(config.edits).read_bytes()).hexdigest()
    total = len(revisions)
    for i, revision in enumerate(revisions):
        report(progress, "pythia", i, total, f"loading {revision or 'default revision'}")
        model, tokenizer = load_model(config.model, revision, config.dtype, resolve_device(config.device))
        builtin = config.builtin_task
        prompts = task_prompts(builtin, tokenizer, config.n, config.seed) if builtin else []
        encoded = encode_prompts(tokenizer, prompts) if prompts else None
        answers = [encode_answers(tokenizer, f.examples) for f in task_files]
        n_prompts = len(prompts)
        report(progress, "pythia", i, total, f"scoring {revision or 'default revision'}")
        base = score(model, encoded, config.batch_size) if encoded is not None else None
        base_answers = [score_answers(model, a, config.batch_size) for a in answers]
        edits = config_edits(model, config)
        with apply_edits(model, edits, factors=_factors(model, edits, config), method=config.method) as truncation:
            cut = score(model, encoded, config.batch_size) if encoded is not None else None
            cut_answers = [score_answers(model, a, config.batch_size) for a in answers]
            modules = edit_spec(truncation, edits, config.method)
        result = RevisionResult(
            revision=revision,
            baseline=None,
            truncated=None,
            modules=modules,
            gain_mean_of_ratios=None,
            gain_ratio_of_means=None,
            answers=[
                AnswerTaskScore(
                    task=f.name,
                    path=f.path,
                    sha256=f.sha256,
                    n=len(f),
                    baseline=aggregate_answers(b),
                    truncated=aggregate_answers(c),
                    baseline_predictions=predictions(a, b),
                    truncated_predictions=predictions(a, c),
                )
                for f, a, b, c in zip(task_files, answers, base_answers, cut_answers)
            ],
            record=run_record(
                config.model,
                revision,
                tokenizer,
                task_files={f.name: f.sha256 for f in task_files},
                # run pythia evaluates every prompt (no selection split); the seed draws the built-in prompts
                split={"mode": "all", "seed": config.seed},
                svd_method=config.method,
                svd_seed=svd_seed(config),
            )
            | {"edits_sha256": edits_sha256},
        )
        if base is not None and cut is not None:
            base_metrics, cut_metrics = aggregate(base), aggregate(cut)
            result.baseline, result.truncated = base_metrics, cut_metrics
            result.gain_mean_of_ratios = _gain(cut_metrics.mean_of_ratios, base_metrics.mean_of_ratios)
            result.gain_ratio_of_means = _gain(cut_metrics.ratio_of_means, base_metrics.ratio_of_means)
            result.prompts = [
                PromptScore(text=p.text, answer=p.answer, subject=p.subject, baseline=b, truncated=c)
                for p, b, c in zip(prompts, base.per_prompt(), cut.per_prompt())
            ]
        results.append(result)
        del model
        report(progress, "pythia", i + 1, total, f"done {revision or 'default revision'}")
    return PythiaResult(config=config, n_prompts=n_prompts, revisions=results, seconds=time.perf_counter() - start)


def prediction_rows(result: PythiaResult) -> list[dict[str, Any]]:
    """Per-example values of every task, revision and variant (baseline, truncated), JSON-ready.

    Task files give :class:`fasttrunc.tasks.answers.AnswerPrediction`'s fields; the built-in task
    its prompt and :class:`fasttrunc.tasks.metrics.PromptMetrics`' fields.
    """
    rows: list[dict[str, Any]] = []
    builtin = result.config.builtin_task
    for rev in result.revisions:
        for variant in ("baseline", "truncated"):
            head = {"revision": rev.revision, "variant": variant}
            for index, p in enumerate(rev.prompts):
                example = {"task": builtin, "index": index, "prompt": p.text, "answer": p.answer, "subject": p.subject}
                rows.append({**head, **example, **jsonable(getattr(p, variant))})
            for task in rev.answers:
                for prediction in getattr(task, f"{variant}_predictions"):
                    rows.append({**head, "task": task.task, **jsonable(prediction)})
    return rows
