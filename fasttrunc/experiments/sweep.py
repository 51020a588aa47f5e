"""LASER's grid on a GPT-NeoX model: layers x matrices x ranks, one SVD per matrix.

Each target matrix is factorized once (``factorize``: batched over matrices of one shape, up to
the largest rank any cell needs); every cell then goes through ``truncate_`` with those factors,
which slices them to the cell's ranks, and restores the model, so a cell costs one evaluation and
no factorization. The first ``select_fraction`` of the
(seeded, shuffled) prompts choose the best cell; the rest report it, as LASER does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from torch import nn

from fasttrunc import checks
from fasttrunc.experiments.pythia import ModelRunSettings, check_task, task_prompts
from fasttrunc.families import detect_family, expand_matrices, module_kind
from fasttrunc.hub import load_model
from fasttrunc.ranks import resolve_rank, validate_rank_spec
from fasttrunc.runs import Progress, ResultMixin, report, resolve_device, synchronize
from fasttrunc.tasks.metrics import DEFAULT_BATCH_SIZE, EncodedPrompts, TaskMetrics, aggregate, encode_prompts, score
from fasttrunc.truncation import Targets, factorize, resolve_targets, truncate_

# LASER's rho grid (Sharma et al. 2023).
LASER_RANKS = (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01, 0.005)
SELECT_BY = ("mean_p_correct", "accuracy", "mean_of_ratios", "ratio_of_means", "mean_logit_diff")


@dataclass(frozen=True, kw_only=True)
class SweepConfig(ModelRunSettings):
    model: str
    layers: tuple[int, ...] | None = None  # None: every layer
    matrices: tuple[str, ...] = (
        "mlp_in",
        "mlp_out",
    )  # each item is one grid row; a group truncates its members together
    ranks: tuple[int | float, ...] = LASER_RANKS
    tasks: tuple[str, ...] = ("ioi",)
    select_fraction: float = 0.2
    select_by: str = "mean_p_correct"

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.text("model", self.model)
        tasks = checks.non_empty("tasks", self.tasks)
        for task in tasks:
            check_task(task)
        ranks = checks.non_empty("ranks", self.ranks)
        for rank in ranks:
            validate_rank_spec(rank)
        matrices = checks.non_empty("matrices", self.matrices)
        for matrix in matrices:
            expand_matrices(checks.text("matrix", matrix))  # one alias or group per grid row
        checks.real("select_fraction", self.select_fraction, 0.0, 1.0, low_open=True, high_open=True)
        checks.choice("select_by", self.select_by, SELECT_BY)
        if self.select_by == "mean_logit_diff" and "factual" in tasks:
            raise ValueError("select_by mean_logit_diff needs a subject name, which only the ioi task has")
        if self.layers is not None:
            layers = [checks.integer("layer", layer) for layer in checks.non_empty("layers", self.layers)]
            object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "tasks", tuple(tasks))
        object.__setattr__(self, "ranks", tuple(ranks))
        object.__setattr__(self, "matrices", tuple(matrices))


@dataclass
class Cell:
    layer: int
    matrix: str
    rank: int | float  # as given (rho or absolute)
    ranks: dict[str, int]  # module -> absolute rank used
    select: dict[str, TaskMetrics]  # task -> metrics on the selection prompts
    report: dict[str, TaskMetrics]  # task -> metrics on the report prompts


@dataclass
class Best:
    layer: int
    matrix: str
    rank: int | float
    select_score: float
    baseline_select_score: float
    report: TaskMetrics
    baseline_report: TaskMetrics


@dataclass
class SweepRevision:
    revision: str | None
    layers: list[int]  # the layers swept, as indices from 0
    baseline_select: dict[str, TaskMetrics]
    baseline_report: dict[str, TaskMetrics]
    cells: list[Cell]
    best: dict[str, Best]  # task -> best cell (chosen on the selection prompts)
    n_select: dict[str, int]
    n_report: dict[str, int]
    svd_seconds: float
    eval_seconds: float
    matrices_factorized: int
    svd_calls: int


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


def _evaluate(
    model: nn.Module, encoded: dict[str, EncodedPrompts], splits: dict[str, int], batch_size: int
) -> tuple[dict[str, TaskMetrics], dict[str, TaskMetrics]]:
    """Metrics of every task on its selection prompts and on its report prompts."""
    select: dict[str, TaskMetrics] = {}
    reported: dict[str, TaskMetrics] = {}
    for task, enc in encoded.items():
        scores = score(model, enc, batch_size)
        select[task] = aggregate(scores.subset(slice(0, splits[task])))
        reported[task] = aggregate(scores.subset(slice(splits[task], None)))
    return select, reported


@dataclass
class Grid:
    """What :func:`sweep_model` measured: the baseline and every cell, on both prompt splits."""

    baseline_select: dict[str, TaskMetrics]
    baseline_report: dict[str, TaskMetrics]
    cells: list[Cell]
    svd_seconds: float
    eval_seconds: float
    matrices_factorized: int
    svd_calls: int


def _only(names: Collection[str]) -> Callable[[str, nn.Module], bool]:
    """A ``truncate_`` target selecting exactly ``names``."""
    chosen = frozenset(names)
    return lambda name, module: name in chosen


def sweep_model(
    model: nn.Module,
    encoded: dict[str, EncodedPrompts],
    splits: dict[str, int],
    layers: Sequence[int],
    matrices: Sequence[str],
    ranks: Sequence[int | float],
    *,
    method: str = "exact",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = None,
    label: str = "",
) -> Grid:
    """Evaluate the baseline and every (layer, matrix, rank) cell of ``model`` on ``encoded``.

    Checks every rank against every matrix first, factorizes each target matrix once
    (:func:`fasttrunc.truncation.factorize`, up to the largest rank any cell needs), then truncates
    each cell through :func:`fasttrunc.truncation.truncate_` with those factors and restores;
    ``model`` ends as it started.
    """
    rows = [(layer, matrix) for layer in layers for matrix in matrices]
    targets = {row: resolve_targets(model, Targets(layers=[row[0]], matrices=row[1])) for row in rows}
    cell_ranks: dict[tuple[int, str, int | float], dict[str, int]] = {}
    max_ranks: dict[str, int] = {}
    for (layer, matrix), names in targets.items():
        for rank in ranks:
            ks = {name: resolve_rank(rank, *_shape(model, name)) for name in names}
            for name, k in ks.items():
                max_ranks[name] = max(max_ranks.get(name, 0), k)
            cell_ranks[(layer, matrix, rank)] = ks
    total = len(cell_ranks)
    report(progress, "sweep", 0, total, f"{label} factorizing".strip())
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    factors = factorize(model, _only(max_ranks), max_ranks, method=method)
    synchronize(device)
    svd_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_select, base_report = _evaluate(model, encoded, splits, batch_size)
    cells: list[Cell] = []
    for done, ((layer, matrix, rank), ks) in enumerate(cell_ranks.items()):
        with truncate_(model, _only(ks), ks, method=method, factors=factors):
            select, reported = _evaluate(model, encoded, splits, batch_size)
        cells.append(Cell(layer=layer, matrix=matrix, rank=rank, ranks=ks, select=select, report=reported))
        report(progress, "sweep", done + 1, total, f"{label} L{layer} {matrix} {rank}".strip())
    synchronize(device)
    return Grid(
        baseline_select=base_select,
        baseline_report=base_report,
        cells=cells,
        svd_seconds=svd_seconds,
        eval_seconds=time.perf_counter() - t0,
        matrices_factorized=len(factors),
        svd_calls=factors.svd_calls,
    )


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    """``(out, in)`` of a module that ``resolve_targets`` selected."""
    module = model.get_submodule(name)
    kind = module_kind(module)
    assert kind is not None  # resolve_targets selects only the kinds fasttrunc can truncate
    return kind.shape(module)


def _best(grid: Grid, task: str, select_by: str) -> Best:
    """The cell with the highest ``select_by`` on ``task``'s selection prompts."""

    def key(cell: Cell) -> float:
        return float(getattr(cell.select[task], select_by))

    top = max(grid.cells, key=key)
    return Best(
        layer=top.layer,
        matrix=top.matrix,
        rank=top.rank,
        select_score=key(top),
        baseline_select_score=float(getattr(grid.baseline_select[task], select_by)),
        report=top.report[task],
        baseline_report=grid.baseline_report[task],
    )


def _sweep_revision(config: SweepConfig, revision: str | None, progress: Progress) -> SweepRevision:
    model, tokenizer = load_model(config.model, revision, config.dtype, resolve_device(config.device))
    _, _, n_layers = detect_family(model)
    layers = list(range(n_layers)) if config.layers is None else list(config.layers)
    encoded: dict[str, EncodedPrompts] = {}
    splits: dict[str, int] = {}
    for task in config.tasks:
        encoded[task] = encode_prompts(tokenizer, task_prompts(task, tokenizer, config.n, config.seed))
        splits[task] = _split(len(encoded[task]), config.select_fraction)
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
    )
    best = {task: _best(grid, task, config.select_by) for task in config.tasks}
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
    )


def run(config: SweepConfig, progress: Progress = None) -> SweepResult:
    """Sweep every revision of ``config``; the layers of the result are those of the last revision."""
    start = time.perf_counter()
    revisions = [_sweep_revision(config, revision, progress) for revision in config.revisions]
    return SweepResult(
        config=config, layers=revisions[-1].layers, revisions=revisions, seconds=time.perf_counter() - start
    )
