"""LASER's grid on a GPT-NeoX model: layers x matrices x ranks, one SVD per matrix.

Each target matrix is factorized once (``factorize``: batched over matrices of one shape, up to
the largest rank any cell needs); every cell then goes through ``truncate_`` with those factors,
which slices them to the cell's ranks, and restores the model, so a cell costs one evaluation and
no factorization. The first ``select_fraction`` of the
(seeded, shuffled) prompts choose the best cell; the rest report it, as LASER does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fasttrunc import checks
from fasttrunc.edits import EDIT_KINDS, Edit, apply_edit, apply_edits, dense_replacement
from fasttrunc.experiments.prefix import AnswerSet, AnyScores, PrefixCache, PromptSet, aggregate_scores, cat_scores
from fasttrunc.experiments.pythia import ModelRunSettings, check_task, task_prompts
from fasttrunc.families import detect_family, expand_matrices, module_kind
from fasttrunc.hub import load_model
from fasttrunc.ranks import resolve_rank, validate_rank_spec
from fasttrunc.records import run_record
from fasttrunc.runs import Progress, ResultMixin, jsonable, report, resolve_device, synchronize
from fasttrunc.selection import (
    SELECT_TASKS_RULE,
    SPLIT_MODES,
    Candidate,
    StackedEdits,
    best_index,
    combined_key,
    compose_greedy,
    metric_value,
    selection_key,
    split_examples,
)
from fasttrunc.tasks.answers import AnswerMetrics, encode_answers
from fasttrunc.tasks.answers import predictions as answer_predictions
from fasttrunc.tasks.metrics import DEFAULT_BATCH_SIZE, TaskMetrics, encode_prompts
from fasttrunc.tasks.user import is_task_file, load_task
from fasttrunc.truncation import Factors, Targets, Truncation, factorize, replace_modules_, resolve_targets, truncate_

Metrics = TaskMetrics | AnswerMetrics

# LASER's rho grid (Sharma et al. 2023).
LASER_RANKS = (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01, 0.005)
SEARCHES = ("exhaustive", "screened")
COMPOSE = ("greedy",)
# What can select: any number the task's metrics give (built-in tasks: TaskMetrics; task files:
# AnswerMetrics). accuracy breaks ties by the lower log-loss where the task gives one (LASER).
PROMPT_METRICS = tuple(f.name for f in fields(TaskMetrics) if f.name != "n")
ANSWER_METRICS = tuple(f.name for f in fields(AnswerMetrics) if f.name not in ("n", "n_distractor"))
SELECT_BY = tuple(dict.fromkeys(PROMPT_METRICS + ANSWER_METRICS))


@dataclass(frozen=True, kw_only=True)
class SweepConfig(ModelRunSettings):
    model: str
    layers: tuple[int, ...] | None = None  # None: every layer
    matrices: tuple[str, ...] = (
        "mlp_in",
        "mlp_out",
    )  # each item is one grid row; a group truncates its members together
    ranks: tuple[int | float, ...] = LASER_RANKS
    tasks: tuple[str, ...] = ("ioi",)  # built-in tasks and task files (.jsonl / .csv)
    select_fraction: float = 0.2
    select_by: str | None = None  # None: mean_p_correct on built-in tasks, accuracy (LASER's) with a task file
    select_tasks: tuple[str, ...] | None = None  # several tasks choose one cell together (SELECT_TASKS_RULE)
    split: str = "shuffled"  # task files: "shuffled" (seeded) or "laser" (the first select_fraction in file order)
    kinds: tuple[str, ...] = ("keep-top",)  # edit kinds swept (fasttrunc.edits.EDIT_KINDS), each a grid row
    compose: str | None = None  # "greedy": compose edits across layers from the best cell
    save_predictions: bool = False  # keep per-example values of the baseline and the best cell
    hub_record: bool = True  # ask the hub for the model's commit hash for the record (skipped offline)
    cache_budget_mb: float = 1024.0  # device memory for the cached prefixes
    search: str = "exhaustive"  # or "screened": successive halving on the selection prompts
    keep: int | None = None  # screened: cells evaluated exactly (default: 1 in 20)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.real("cache_budget_mb", self.cache_budget_mb, 0.0, float("inf"), low_open=True)
        checks.choice("search", self.search, SEARCHES)
        if self.keep is not None:
            checks.positive("keep", self.keep)
            if self.search != "screened":
                raise ValueError("keep applies to search screened only")
        checks.text("model", self.model)
        tasks = checks.non_empty("tasks", self.tasks)
        for task in tasks:
            if not is_task_file(checks.text("task", task)):
                check_task(task)
            elif not Path(task).expanduser().is_file():
                raise ValueError(f"task file {task} does not exist")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks {list(tasks)} name a task twice; give each once")
        checks.choice("split", self.split, SPLIT_MODES)
        kinds = checks.non_empty("kinds", self.kinds)
        for kind in kinds:
            checks.choice("edit kind", kind, EDIT_KINDS)
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"edit kinds {list(kinds)} name a kind twice; give each once")
        if self.compose is not None:
            checks.choice("compose", self.compose, COMPOSE)
        if self.select_tasks is not None:
            chosen = checks.non_empty("select_tasks", self.select_tasks)
            for task in chosen:
                if task not in tasks:
                    raise ValueError(f"select task {task!r} is not among the swept tasks {list(tasks)}")
            object.__setattr__(self, "select_tasks", tuple(dict.fromkeys(chosen)))
        ranks = checks.non_empty("ranks", self.ranks)
        for rank in ranks:
            validate_rank_spec(rank)
        matrices = checks.non_empty("matrices", self.matrices)
        for matrix in matrices:
            expand_matrices(checks.text("matrix", matrix))  # one alias or group per grid row
        checks.real("select_fraction", self.select_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if self.select_by is not None:
            checks.choice("select_by", self.select_by, SELECT_BY)
        for task in self.selecting(tasks):
            allowed = ANSWER_METRICS if is_task_file(task) else PROMPT_METRICS
            if self.metric not in allowed:
                raise ValueError(
                    f"select_by {self.metric} is not a metric of task {task}; allowed: {', '.join(allowed)}"
                )
        if self.metric in ("mean_logit_diff", "logit_diff_accuracy", "mean_p_subject") and "factual" in tasks:
            raise ValueError(f"select_by {self.metric} needs a subject name, which only the ioi task has")
        if self.search == "screened" and len(self.selecting(tasks)) > 1:
            raise ValueError(
                f"screened search ranks cells by one task; got {len(self.selecting(tasks))} selecting tasks "
                "(give --select-tasks one of them, or search exhaustive)"
            )
        if self.layers is not None:
            layers = [checks.integer("layer", layer) for layer in checks.non_empty("layers", self.layers)]
            object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "tasks", tuple(tasks))
        object.__setattr__(self, "kinds", tuple(kinds))
        object.__setattr__(self, "ranks", tuple(ranks))
        object.__setattr__(self, "matrices", tuple(matrices))

    def selecting(self, tasks: Sequence[str] | None = None) -> tuple[str, ...]:
        """The tasks that choose the best cell together: ``select_tasks``, else each task its own."""
        return tuple(self.select_tasks or (tasks if tasks is not None else self.tasks))

    def metric_for(self, task: str) -> str:
        """The metric shown for ``task``: the selection metric where the task has it, else the task's default."""
        allowed = ANSWER_METRICS if is_task_file(task) else PROMPT_METRICS
        if self.metric in allowed:
            return self.metric
        return "accuracy" if is_task_file(task) else "mean_p_correct"

    @property
    def metric(self) -> str:
        """The selection metric: ``select_by``, else mean_p_correct (built-in tasks) or accuracy (with a task file)."""
        if self.select_by is not None:
            return self.select_by
        return "accuracy" if any(is_task_file(t) for t in self.selecting(self.tasks)) else "mean_p_correct"


@dataclass
class Cell:
    layer: int
    matrix: str
    rank: int | float  # as given (rho or absolute)
    ranks: dict[str, int]  # module -> absolute rank used
    select: dict[str, Metrics]  # task -> metrics on the selection prompts
    report: dict[str, Metrics]  # task -> metrics on the report prompts
    form: str = "factored"  # how the edit ran: "factored" (TruncatedLinear) or "dense" (rank-r weight)
    evaluated: bool = True  # False: screened search only estimated it (``select`` on a few prompts, no report)
    estimate_prompts: int = 0  # for an estimate: how many selection prompts it saw
    kind: str = "keep-top"  # the edit kind (fasttrunc.edits.EDIT_KINDS)

    @property
    def key(self) -> CellKey:
        return (self.layer, self.matrix, self.rank, self.kind)

    def edits(self) -> list[Edit]:
        """The cell as an edit list (``fasttrunc.edits``): one edit per module, at its absolute rank."""
        return [Edit(module=name, rank=k, kind=self.kind) for name, k in self.ranks.items()]


@dataclass
class Best:
    layer: int
    matrix: str
    rank: int | float
    select_score: float  # the selection metric (several tasks: the combined relative score)
    baseline_select_score: float
    report: Metrics
    baseline_report: Metrics
    kind: str = "keep-top"

    @property
    def key(self) -> CellKey:
        return (self.layer, self.matrix, self.rank, self.kind)


@dataclass
class Composed:
    """``--compose greedy``: the accepted edits in order, the selection score after each, and the
    report-set metrics of the whole composition (per task) beside the baseline's."""

    order: str
    start: list[int | str | float]  # the best single cell it started from: layer, matrix, rank, kind
    start_score: float
    edits: list[Edit]
    steps: list[dict[str, Any]]  # {"edits": [...], "score": ..., "key": [...]} per accepted step
    trials: int  # candidate steps evaluated
    rejected: int
    score: float
    report: dict[str, Metrics]
    baseline_report: dict[str, Metrics]
    # The full comparison keys (higher is better): the oriented metric, then its tie-break
    # (accuracy: the negated log-loss), which decides a step when the metric ties.
    start_key: list[float] = field(default_factory=list)
    key: list[float] = field(default_factory=list)


@dataclass
class SweepRevision:
    revision: str | None
    layers: list[int]  # the layers swept, as indices from 0
    baseline_select: dict[str, Metrics]
    baseline_report: dict[str, Metrics]
    cells: list[Cell]
    best: dict[str, Best]  # task -> best cell (chosen on the selection prompts)
    n_select: dict[str, int]
    n_report: dict[str, int]
    svd_seconds: float
    eval_seconds: float
    matrices_factorized: int
    svd_calls: int
    cells_evaluated: int = 0  # cells evaluated exactly (all of them unless the search was screened)
    captures: int = 0  # unedited passes that filled the prefix cache
    joint: JointBest | None = None  # select_tasks of several tasks: the one cell chosen for them all
    composition: Composed | None = None  # compose greedy
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> how its prompts were split
    record: dict[str, Any] = field(default_factory=dict)  # fasttrunc.records.run_record
    predictions: dict[str, dict[str, list[dict[str, Any]]]] | None = None  # save_predictions: baseline / best


@dataclass
class SweepResult(ResultMixin):
    config: SweepConfig
    layers: list[int]
    revisions: list[SweepRevision]
    seconds: float


def _split(n: int, fraction: float) -> int:
    """How many of ``n`` prompts select; at least one prompt on each side."""
    if n < 2:
        raise ValueError(f"the sweep needs at least 2 prompts (some select, some report); got {n}")
    return min(n - 1, max(1, round(fraction * n)))


@dataclass
class Grid:
    """What :func:`sweep_model` measured: the baseline and every cell, on both prompt splits."""

    baseline_select: dict[str, Metrics]
    baseline_report: dict[str, Metrics]
    cells: list[Cell]
    svd_seconds: float
    eval_seconds: float
    matrices_factorized: int
    svd_calls: int
    factors: Factors | None = None  # the factors the cells were cut from (for composition and predictions)
    cache_mb: float = 0.0  # the largest prefix cache held at once
    captures: int = 0  # unedited passes that filled the cache (one per group of layers the budget holds)


def _only(names: Collection[str]) -> Callable[[str, nn.Module], bool]:
    """A ``truncate_`` target selecting exactly ``names``."""
    chosen = frozenset(names)
    return lambda name, module: name in chosen


def dense_is_cheaper(rank: int, shape: tuple[int, int]) -> bool:
    """Whether the dense rank-``rank`` weight costs no more FLOPs than its two factors."""
    out_features, in_features = shape
    return rank * (in_features + out_features) >= in_features * out_features


def _rank_k(triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int) -> torch.Tensor:
    """The rank-``k`` weight ``U_k S_k Vh_k`` of a module's factors."""
    u, s, vh = triplets
    return (u[:, :k] * s[:k]) @ vh[:k]


def _edit(
    model: nn.Module, ks: dict[str, int], factors: Factors, method: str, kind: str = "keep-top"
) -> tuple[Truncation, str]:
    """The cell's edit in its cheaper form; returns the restorable swap and ``"dense"`` or ``"factored"``.

    keep-top runs factored or dense, whichever costs fewer FLOPs; remove-top (the weight less its
    top-k components, from the same factors) and magnitude pruning are dense by nature.
    """
    if kind != "keep-top":
        return apply_edit(model, _only(ks), kind, ks, factors=factors, method=method), "dense"
    shapes = {name: _shape(model, name) for name in ks}
    if all(dense_is_cheaper(k, shapes[name]) for name, k in ks.items()):
        with torch.no_grad():
            dense = {
                name: dense_replacement(model.get_submodule(name), _rank_k(factors[name], k)) for name, k in ks.items()
            }
        return replace_modules_(model, dense), "dense"
    return truncate_(model, _only(ks), ks, method=method, factors=factors), "factored"


class Shard:
    """Which cells this process evaluates, and how their results reach rank 0 (one process: all)."""

    rank = 0
    world = 1

    def gather(self, item: object) -> list[object]:
        """Every rank's ``item`` of this round, in rank order, on every rank."""
        return [item]


CellKey = tuple[int, str, int | float, str]  # layer, matrix, rank as given, edit kind


def sweep_model(
    model: nn.Module,
    encoded: Mapping[str, PromptSet],
    splits: dict[str, int],
    layers: Sequence[int],
    matrices: Sequence[str],
    ranks: Sequence[int | float],
    *,
    method: str = "exact",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = None,
    label: str = "",
    cache_budget_mb: float = 1024.0,
    done: Mapping[CellKey, Cell] | None = None,
    on_cell: Callable[[Cell], None] | None = None,
    shard: Shard | None = None,
    search: str = "exhaustive",
    keep: int | None = None,
    select_by: str = "mean_p_correct",
    kinds: Sequence[str] = ("keep-top",),
    svd_seed: int = 0,
) -> Grid:
    """Evaluate the baseline and every (layer, matrix, rank) cell of ``model`` on ``encoded``.

    Checks every rank against every matrix first, factorizes each target matrix once
    (:func:`fasttrunc.truncation.factorize`, up to the largest rank any cell needs), then runs the
    cells layer by layer with the blocks before the layer replayed from a cache
    (:class:`fasttrunc.experiments.prefix.PrefixCache`, at most ``cache_budget_mb`` at once), each
    edit in its cheaper form (:func:`dense_is_cheaper`), restoring after each; ``model`` ends as
    it started. Cells in ``done`` are taken as they are; ``on_cell`` gets each new cell (on rank
    0 of ``shard``, which evaluates its share of the cells and gathers the rest).
    """
    shard = shard or Shard()
    done = dict(done or {})
    _, _, n_layers = detect_family(model)
    rows = [(layer, matrix) for layer in layers for matrix in matrices]
    targets = {row: resolve_targets(model, Targets(layers=[row[0]], matrices=row[1])) for row in rows}
    cell_ranks: dict[CellKey, dict[str, int]] = {}
    max_ranks: dict[str, int] = {}
    for (layer, matrix), names in targets.items():
        for kind in kinds:
            for rank in ranks:
                ks = {name: resolve_rank(rank, *_shape(model, name)) for name in names}
                if kind != "magnitude":  # magnitude pruning needs no factors
                    for name, k in ks.items():
                        max_ranks[name] = max(max_ranks.get(name, 0), k)
                cell_ranks[(layer % n_layers, matrix, rank, kind)] = ks
    total = len(cell_ranks)
    if shard.world > total:
        raise ValueError(f"{shard.world} ranks for {total} cells: start at most {total} processes")
    report(progress, "sweep", len(done), total, f"{label} factorizing".strip())
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    seeded = {} if method == "exact" else {"generator": torch.Generator(device=device).manual_seed(svd_seed)}
    factors = factorize(model, _only(max_ranks), max_ranks, method=method, **seeded)
    synchronize(device)
    svd_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    tasks = list(encoded)
    if search == "exhaustive":
        sets = [part for t in tasks for part in (encoded[t].rows(0, splits[t]), encoded[t].rows(splits[t], None))]
    else:
        if len(tasks) != 1:
            raise ValueError(f"screened search ranks cells by one task's selection metric; got tasks {tasks}")
        keep = max(1, round(total / 20)) if keep is None else keep
        if not 1 <= keep < total:
            raise ValueError(f"keep {keep} is out of range for {total} cells; allowed: 1..{total - 1}")
        bounds = _screen_bounds(splits[tasks[0]], total, keep)
        enc = encoded[tasks[0]]
        sets = [enc.rows(lo, hi) for lo, hi in zip([0, *bounds[:-1]], bounds)] + [enc.rows(splits[tasks[0]], None)]
    cache = PrefixCache.for_model(model, batch_size)
    swept = sorted({key[0] for key in cell_ranks})
    engine = _Engine(model, cache, sets, _plan(cache, sets, swept, cache_budget_mb), shard)
    results: dict[CellKey, Cell] = dict(done)

    def edit(key: CellKey) -> tuple[Truncation, str]:
        return _edit(model, cell_ranks[key], factors, method, key[3])

    if search == "exhaustive":

        def finished(key: CellKey, form: str, scores: list[AnyScores]) -> None:
            select, reported = _metrics(tasks, scores)
            layer, matrix, rank, kind = key
            cell = Cell(layer, matrix, rank, cell_ranks[key], select, reported, form=form, kind=kind)
            results[key] = cell
            if on_cell is not None:
                on_cell(cell)
            report(progress, "sweep", len(results), total, f"{label} L{layer} {matrix} {rank} {kind}".strip())

        every = tuple(range(len(sets)))
        engine.run([(key, every) for key in cell_ranks if key not in results], edit, finished)
    else:
        assert keep is not None  # set above for a screened search
        _screen(engine, tasks[0], cell_ranks, bounds, keep, select_by, edit, results, progress, label, on_cell)
    baseline = engine.baseline or cache.capture(sets, [])  # nothing left to sweep: the baseline alone
    synchronize(device)
    if search == "exhaustive":
        base_select, base_report = _metrics(tasks, baseline)
    else:
        base_select = {tasks[0]: aggregate_scores(cat_scores(baseline[:-1]))}
        base_report = {tasks[0]: aggregate_scores(baseline[-1])}
    return Grid(
        baseline_select=base_select,
        baseline_report=base_report,
        cells=[results[key] for key in cell_ranks if key in results],
        svd_seconds=svd_seconds,
        eval_seconds=time.perf_counter() - t0,
        matrices_factorized=len(factors),
        svd_calls=factors.svd_calls,
        factors=factors,
        cache_mb=engine.largest / 2**20,
        captures=engine.captures,
    )


# Successive halving: each round keeps 1 / SCREEN_ETA of the cells on SCREEN_ETA x the prompts.
SCREEN_ETA = 2


def _screen_bounds(n_select: int, total: int, keep: int) -> list[int]:
    """Cumulative selection-prompt counts of the screening rounds; the last is all of them."""
    alive, rounds = total, 0
    while alive > keep:
        alive = max(keep, -(-alive // SCREEN_ETA))
        rounds += 1
    rounds = min(rounds, n_select - 1)
    bounds: list[int] = []
    for i in range(rounds):
        want = math.ceil(n_select * SCREEN_ETA ** (i - rounds))
        bounds.append(min(n_select - rounds + i, max(bounds[-1] + 1 if bounds else 1, want)))
    return [*bounds, n_select]


def _screen(
    engine: _Engine,
    task: str,
    cell_ranks: Mapping[CellKey, dict[str, int]],
    bounds: list[int],
    keep: int,
    select_by: str,
    edit: Callable[[CellKey], tuple[Truncation, str]],
    results: dict[CellKey, Cell],
    progress: Progress,
    label: str,
    on_cell: Callable[[Cell], None] | None = None,
) -> None:
    """Estimate every cell on a few selection prompts, halve, repeat; evaluate the last ``keep`` exactly.

    ``on_cell`` gets every estimated cell when the screening rounds end, then each exact cell as
    it finishes. ``results`` may hold the cells of an interrupted run of the same search: when
    it holds every estimate (the screening finished), the rounds are not run again and only the
    exact cells it lacks are evaluated, on every prompt set (the same batches, so the same
    numbers); otherwise the screening runs again from the start.
    """
    seen: dict[CellKey, list[AnyScores]] = {key: [] for key in cell_ranks}
    forms: dict[CellKey, str] = {}

    def add(key: CellKey, form: str, scores: list[AnyScores]) -> None:
        seen[key].extend(scores)
        forms[key] = form

    def value(key: CellKey) -> tuple[float, ...]:
        metrics = aggregate_scores(cat_scores(seen[key]))
        if getattr(metrics, select_by) is None or math.isnan(getattr(metrics, select_by)):
            return (-math.inf,)
        return selection_key(metrics, select_by)

    rounds = len(bounds) - 1
    estimated = [key for key in cell_ranks if key in results and not results[key].evaluated]
    final = keep if rounds else len(cell_ranks)  # cells the rounds leave for exact evaluation
    if len(estimated) == len(cell_ranks) - final:  # the screening rounds had finished (or there are none)
        alive = [key for key in cell_ranks if key not in estimated]
    else:
        for key in cell_ranks:
            results.pop(key, None)
        alive = list(cell_ranks)
        for i in range(rounds):
            engine.run([(key, (i,)) for key in alive], edit, add)
            report(progress, "sweep", i + 1, rounds + 1, f"{label} screening round {i + 1}: {len(alive)} cells".strip())
            survivors = max(keep, -(-len(alive) // SCREEN_ETA)) if i < rounds - 1 else keep
            alive = sorted(alive, key=value, reverse=True)[:survivors]
        for key in cell_ranks:
            if key not in alive:
                layer, matrix, rank, kind = key
                select = {task: aggregate_scores(cat_scores(seen[key]))}
                results[key] = Cell(
                    layer, matrix, rank, dict(cell_ranks[key]), select, {}, form=forms[key], evaluated=False,
                    estimate_prompts=bounds[len(seen[key]) - 1], kind=kind,
                )  # fmt: skip
                if on_cell is not None:
                    on_cell(results[key])
    n_sets = len(bounds) + 1

    def exact(key: CellKey, form: str, scores: list[AnyScores]) -> None:
        add(key, form, scores)
        layer, matrix, rank, kind = key
        select = {task: aggregate_scores(cat_scores(seen[key][:-1]))}
        reported = {task: aggregate_scores(seen[key][-1])}
        results[key] = Cell(layer, matrix, rank, dict(cell_ranks[key]), select, reported, form=forms[key], kind=kind)
        if on_cell is not None:
            on_cell(results[key])

    todo = [key for key in alive if key not in results]
    engine.run([(key, tuple(range(len(seen[key]), n_sets))) for key in todo], edit, exact)
    report(progress, "sweep", rounds + 1, rounds + 1, f"{label} {len(alive)} cells evaluated exactly".strip())


class _Engine:
    """Runs (cell, prompt sets) items layer group by layer group, sharded, from the cached prefix.

    ``chunks`` splits the prompt sets at batch boundaries into parts whose cache fits the budget
    (one chunk, every set whole, when a layer's cache fits): each chunk is captured in turn and
    every cell of the group scored on it, so a cell's scores are those of its sets whole (the
    batches are the same ones).
    """

    def __init__(
        self,
        model: nn.Module,
        cache: PrefixCache,
        sets: Sequence[PromptSet],
        plan: tuple[list[list[int]], list[list[tuple[int, PromptSet]]]],
        shard: Shard,
    ):
        self.model, self.cache, self.sets, self.shard = model, cache, sets, shard
        self.groups, self.chunks = plan
        self.baseline: list[AnyScores] | None = None
        self.captures = self.largest = 0

    def run(
        self,
        items: Sequence[tuple[CellKey, tuple[int, ...]]],
        edit: Callable[[CellKey], tuple[Truncation, str]],
        finished: Callable[[CellKey, str, list[AnyScores]], None],
    ) -> None:
        shard = self.shard
        for group in self.groups:
            todo = [item for item in items if item[0][0] in group]
            if not todo and self.baseline is not None:
                continue
            sets_of = dict(todo)  # cell -> the prompt sets it is scored on
            base: dict[int, list[AnyScores]] = {i: [] for i in range(len(self.sets))}
            parts: dict[CellKey, tuple[str, dict[int, list[AnyScores]]]] = {}
            for c, chunk in enumerate(self.chunks):
                last = c == len(self.chunks) - 1
                encs = [enc for _, enc in chunk]
                for (i, _), scores in zip(chunk, self.cache.capture(encs, group)):
                    base[i].append(scores)
                self.captures += 1
                self.largest = max(self.largest, self.cache.bytes)
                for start in range(0, len(todo), shard.world):
                    out = None
                    if start + shard.rank < len(todo):
                        key, which = todo[start + shard.rank]
                        picked = [j for j, (i, _) in enumerate(chunk) if i in which]
                        form, got = "", []
                        if picked:  # this chunk holds some of the cell's prompts
                            truncation, form = edit(key)
                            with truncation:
                                got = self.cache.score(key[0], encs, picked)
                        out = (key, form, [(chunk[j][0], g) for j, g in zip(picked, got)])
                    for item in shard.gather(out):
                        if item is None:
                            continue
                        key, form, pieces = cast("tuple[CellKey, str, list[tuple[int, AnyScores]]]", item)
                        entry = parts.setdefault(key, ("", {}))
                        if form:
                            entry = parts[key] = (form, entry[1])
                        for i, piece in pieces:
                            entry[1].setdefault(i, []).append(piece)
                        if last:
                            finished(key, entry[0], [cat_scores(entry[1][i]) for i in sets_of[key]])
                            del parts[key]
                self.cache.outputs = {}
            if self.baseline is None:
                self.baseline = [cat_scores(base[i]) for i in range(len(self.sets))]


def _metrics(tasks: Sequence[str], scores: Sequence[AnyScores]) -> tuple[dict[str, Metrics], dict[str, Metrics]]:
    """Per task, the metrics of its selection set and of its report set (``scores`` in that order)."""
    select = {t: aggregate_scores(scores[2 * i]) for i, t in enumerate(tasks)}
    reported = {t: aggregate_scores(scores[2 * i + 1]) for i, t in enumerate(tasks)}
    return select, reported


def _plan(
    cache: PrefixCache, sets: Sequence[PromptSet], layers: Sequence[int], budget_mb: float
) -> tuple[list[list[int]], list[list[tuple[int, PromptSet]]]]:
    """Layer groups and prompt chunks whose prefix caches fit ``budget_mb`` together.

    When one layer's cache of every prompt fits, the layers go in groups that fit (one capture
    each) and the prompts in one chunk; otherwise one layer at a time, its prompts in chunks of
    whole batches that fit. A budget below one batch of one layer is a one-line ValueError.
    """
    budget = budget_mb * 2**20
    whole = [(i, enc) for i, enc in enumerate(sets)]
    caching = [layer for layer in layers if layer > 0]  # layer 0 caches nothing; the others the same amount
    if not caching:
        return [list(layers)], [whole]
    sizes = cache.batch_bytes(sets, caching[0])
    per_layer = sum(sum(s) for s in sizes)
    if per_layer <= budget:
        size = max(1, int(budget // per_layer))
        return [list(layers[i : i + size]) for i in range(0, len(layers), size)], [whole]
    largest = max(max(s) for s in sizes if s)
    if any(isinstance(enc, AnswerSet) for enc in sets):
        raise ValueError(
            f"cache budget {budget_mb:g} MB holds less than one layer's cached prefix ({per_layer / 2**20:.3g} MB) "
            "and a task file's examples are cached whole; raise --cache-budget"
        )
    if largest > budget:
        raise ValueError(
            f"cache budget {budget_mb:g} MB holds less than one batch of one layer's cached prefix "
            f"({largest / 2**20:.3g} MB); raise --cache-budget or lower --batch-size"
        )
    chunks: list[list[tuple[int, PromptSet]]] = [[]]
    held = 0
    step = cache.batch_size
    for i, enc in enumerate(sets):
        for b, nbytes in enumerate(sizes[i]):
            if held + nbytes > budget and chunks[-1]:
                chunks.append([])
                held = 0
            held += nbytes
            chunks[-1].append((i, enc.rows(b * step, (b + 1) * step)))
    return [[layer] for layer in layers], chunks


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    """``(out, in)`` of a module that ``resolve_targets`` selected."""
    module = model.get_submodule(name)
    kind = module_kind(module)
    assert kind is not None  # resolve_targets selects only the kinds fasttrunc can truncate
    return kind.shape(module)


def _best(grid: Grid, task: str, select_by: str) -> Best:
    """The cell that ``select_by`` prefers on ``task``'s selection prompts (accuracy: ties by log-loss)."""
    candidates = [cell for cell in grid.cells if cell.evaluated]  # screened: the exact cells only
    top = candidates[best_index([cell.select[task] for cell in candidates], select_by)]
    return Best(
        layer=top.layer,
        matrix=top.matrix,
        rank=top.rank,
        select_score=metric_value(top.select[task], select_by),
        baseline_select_score=metric_value(grid.baseline_select[task], select_by),
        report=top.report[task],
        baseline_report=grid.baseline_report[task],
        kind=top.kind,
    )


@dataclass
class JointBest:
    """One cell chosen for several tasks at once (:data:`fasttrunc.selection.SELECT_TASKS_RULE`)."""

    tasks: list[str]
    rule: str
    layer: int
    matrix: str
    rank: int | float
    kind: str
    score: float  # the combined relative score of the selection metric (the baseline's is 0)
    select: dict[str, Metrics]
    report: dict[str, Metrics]
    baseline_report: dict[str, Metrics]


def _joint(grid: Grid, tasks: Sequence[str], select_by: str) -> tuple[JointBest, Cell]:
    candidates = [cell for cell in grid.cells if cell.evaluated]
    base = {t: grid.baseline_select[t] for t in tasks}
    keys = [combined_key({t: cell.select[t] for t in tasks}, base, select_by) for cell in candidates]
    top = candidates[max(range(len(keys)), key=lambda i: keys[i])]
    joint = JointBest(
        tasks=list(tasks),
        rule=SELECT_TASKS_RULE,
        layer=top.layer,
        matrix=top.matrix,
        rank=top.rank,
        kind=top.kind,
        score=keys[candidates.index(top)][0],
        select={t: top.select[t] for t in tasks},
        report=dict(top.report),
        baseline_report=dict(grid.baseline_report),
    )
    return joint, top


def _selection_score(
    cache: PrefixCache, sets: Mapping[str, tuple[PromptSet, PromptSet]], tasks: Sequence[str], select_by: str,
    baseline: Mapping[str, Metrics] | None,
) -> tuple[float, ...]:  # fmt: skip
    """The model as it is, scored on the selecting tasks' selection prompts (a plain forward)."""
    metrics = {t: aggregate_scores(cache.evaluate(sets[t][0])) for t in tasks}
    if baseline is None:
        return selection_key(metrics[tasks[0]], select_by)
    return combined_key(metrics, baseline, select_by)


def _compose(
    model: nn.Module,
    grid: Grid,
    start: Cell,
    sets: Mapping[str, tuple[PromptSet, PromptSet]],
    config: SweepConfig,
    batch_size: int,
) -> Composed:
    """Greedy composition (:func:`fasttrunc.selection.compose_greedy`) over the grid's cells, from ``start``.

    Every step is scored with a plain forward on the selection prompts; the model ends as it began.
    """
    tasks = config.selecting()
    joint = len(tasks) > 1
    cache = PrefixCache.for_model(model, batch_size)
    base = {t: grid.baseline_select[t] for t in tasks} if joint else None
    stack = StackedEdits(model, factors=grid.factors, method=config.method)
    candidates = [
        Candidate(layer=cell.layer, edits=tuple(cell.edits())) for cell in grid.cells if cell.key != start.key
    ]
    try:
        evaluate = stack.evaluator(lambda _: _selection_score(cache, sets, tasks, config.metric, base))
        result = compose_greedy(evaluate, candidates, start.edits(), order="descending", settle=stack.sync)
        stack.sync(result.edits)
        report_metrics = {t: aggregate_scores(cache.evaluate(sets[t][1])) for t in sets}
    finally:
        stack.restore()

    def key(score: Any) -> list[float]:
        return [float(v) for v in score]

    return Composed(
        order=result.order,
        start=[start.layer, start.matrix, start.rank, start.kind],
        start_score=key(result.start_score)[0],
        edits=result.edits,
        steps=[
            {"edits": [e.to_dict() for e in added], "score": key(sc)[0], "key": key(sc)} for added, sc in result.steps
        ],
        trials=len(result.trials),
        rejected=sum(not t.accepted for t in result.trials),
        score=key(result.score)[0],
        report=report_metrics,
        baseline_report=dict(grid.baseline_report),
        start_key=key(result.start_score),
        key=key(result.score),
    )


def _predictions(
    model: nn.Module, grid: Grid, cell: Cell | None, sets: Mapping[str, tuple[PromptSet, PromptSet]], batch_size: int,
    method: str,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Per-example values of the baseline (``cell`` None) or of one cell, every task, both sides of the split."""
    cache = PrefixCache.for_model(model, batch_size)
    truncation = None if cell is None else apply_edits(model, cell.edits(), factors=grid.factors, method=method)
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for task, pair in sets.items():
            rows: list[dict[str, Any]] = []
            for side, enc in zip(("select", "report"), pair):
                scores = cache.evaluate(enc)
                if isinstance(enc, AnswerSet):
                    per = [jsonable(p) for p in answer_predictions(enc.encoded, scores)]  # type: ignore[arg-type]
                else:
                    per = [jsonable(p) for p in scores.per_prompt()]  # type: ignore[union-attr]
                rows += [{"split": side, **p} for p in per]
            out[task] = rows
    finally:
        if truncation is not None:
            truncation.restore()
    return out


def _encode_tasks(
    config: SweepConfig, tokenizer: Any
) -> tuple[dict[str, PromptSet], dict[str, int], dict[str, dict[str, Any]], dict[str, str]]:
    """Each task's prompt set (selection prompts first), its selection count, how it was split, task file hashes."""
    encoded: dict[str, PromptSet] = {}
    splits: dict[str, int] = {}
    how: dict[str, dict[str, Any]] = {}
    hashes: dict[str, str] = {}
    for task in config.tasks:
        if is_task_file(task):
            file = load_task(task)
            examples = file.examples if config.n is None else file.examples[: config.n]  # the first n, file order
            split = split_examples(len(examples), config.select_fraction, config.split, config.seed)
            answers = encode_answers(tokenizer, examples)
            encoded[task] = AnswerSet(answers.subset(list(split.select + split.report)))
            splits[task] = len(split.select)
            how[task] = {"mode": split.mode, "seed": split.seed, "fraction": split.fraction,
                         "select_lines": [examples[i].line for i in split.select]}  # fmt: skip
            hashes[task] = file.sha256
        else:
            encoded[task] = encode_prompts(tokenizer, task_prompts(task, tokenizer, config.n, config.seed))
            splits[task] = _split(len(encoded[task]), config.select_fraction)
            how[task] = {"mode": "generated", "seed": config.seed, "fraction": config.select_fraction,
                         "note": "prompts generated in a seeded random order; the first ones select"}  # fmt: skip
    return encoded, splits, how, hashes


def _sweep_revision(
    config: SweepConfig,
    revision: str | None,
    progress: Progress,
    done: Mapping[CellKey, Cell] | None = None,
    on_cell: Callable[[str | None, Cell], None] | None = None,
    shard: Shard | None = None,
) -> SweepRevision:
    model, tokenizer = load_model(config.model, revision, config.dtype, resolve_device(config.device))
    _, _, n_layers = detect_family(model)
    layers = list(range(n_layers)) if config.layers is None else list(config.layers)
    encoded, splits, how, hashes = _encode_tasks(config, tokenizer)
    grid = sweep_model(
        model,
        encoded,
        splits,
        layers,
        config.matrices,
        config.ranks,
        method=config.method,
        batch_size=config.batch_size,
        progress=progress,
        label=f" {revision}" if revision else "",
        cache_budget_mb=config.cache_budget_mb,
        search=config.search,
        keep=config.keep,
        select_by=config.metric,
        kinds=config.kinds,
        svd_seed=config.seed,
        done=done,
        on_cell=None if on_cell is None else (lambda cell: on_cell(revision, cell)),
        shard=shard,
    )
    selecting = config.selecting()
    best = {task: _best(grid, task, config.metric) for task in selecting}
    joint = None
    start = next(c for c in grid.cells if c.key == best[selecting[0]].key)
    if len(selecting) > 1:
        joint, start = _joint(grid, selecting, config.metric)
    sets = {t: (encoded[t].rows(0, splits[t]), encoded[t].rows(splits[t], None)) for t in config.tasks}
    composed = None
    if config.compose == "greedy":
        report(progress, "compose", 0, 1, f"{revision or ''} greedy from L{start.layer} {start.matrix} {start.rank}")
        composed = _compose(model, grid, start, sets, config, config.batch_size)
        report(progress, "compose", 1, 1, f"{revision or ''} {len(composed.edits)} edits")
    predictions = None
    if config.save_predictions:
        predictions = {
            "baseline": _predictions(model, grid, None, sets, config.batch_size, config.method),
            "best": _predictions(model, grid, start, sets, config.batch_size, config.method),
        }
    return SweepRevision(
        revision=revision,
        layers=sorted({layer % n_layers for layer in layers}),  # in range: sweep_model checked them
        baseline_select=grid.baseline_select,
        baseline_report=grid.baseline_report,
        cells=grid.cells,
        best=best,
        n_select=dict(splits),
        n_report={t: len(encoded[t]) - splits[t] for t in encoded},
        svd_seconds=grid.svd_seconds,
        eval_seconds=grid.eval_seconds,
        matrices_factorized=grid.matrices_factorized,
        svd_calls=grid.svd_calls,
        cells_evaluated=sum(cell.evaluated for cell in grid.cells),
        captures=grid.captures,
        joint=joint,
        composition=composed,
        splits=how,
        record=run_record(
            config.model,
            revision,
            tokenizer,
            task_files=hashes,
            split=how,
            svd_method=config.method,
            svd_seed=None if config.method == "exact" else config.seed,
            hub=config.hub_record,
        ),  # fmt: skip
        predictions=predictions,
    )


def run(
    config: SweepConfig,
    progress: Progress = None,
    *,
    done: Mapping[str | None, Mapping[CellKey, Cell]] | None = None,
    on_cell: Callable[[str | None, Cell], None] | None = None,
    shard: Shard | None = None,
) -> SweepResult:
    """Sweep every revision of ``config``; the layers of the result are those of the last revision.

    ``done`` (revision -> cells already finished, as a resumed sweep reads them) are not
    evaluated again; ``on_cell(revision, cell)`` gets every new cell as it finishes (on rank 0 of
    ``shard`` when the sweep is sharded).
    """
    start = time.perf_counter()
    done = done or {}
    revisions = [
        _sweep_revision(config, revision, progress, done.get(revision), on_cell, shard) for revision in config.revisions
    ]
    return SweepResult(
        config=config, layers=revisions[-1].layers, revisions=revisions, seconds=time.perf_counter() - start
    )
