"""A LASER sweep on a GPT-NeoX of a chosen shape: fasttrunc against its floor and two baselines.

The model is built from its config with random weights (timing does not depend on them); the
prompts are random token ids of IOI length. Every path sweeps the same grid (every layer x
{mlp_in, mlp_out} x LASER's 9 rhos by default), scores the same prompts, in the same run:

- ``fasttrunc``: :func:`fasttrunc.experiments.sweep.sweep_model` (factorize once, prefix reuse,
  the cheaper form of each edit, head at the last position; ``search`` exhaustive or screened);
- ``floor``: the suffix forwards alone: every cell's edit built beforehand and the prefix
  captured beforehand, only the forwards from the edited layer on timed;
- ``recipe``: per cell ``torch.svd_lowrank(W.float(), q=rank, niter=2)``, written into the dense
  weight, the Hugging Face forward (full logits), the weight restored from a saved copy;
- ``laser_shipped``: LASER as it ships: per cell a ``deepcopy`` of the model on the CPU, the
  randomized SVD there in fp32, the edited copy moved to the device, prompts scored one at a time.

The metrics are compared cell by cell (both baselines use the randomized SVD, so they agree
closely, not exactly: the spread is reported).
"""

from __future__ import annotations

import dataclasses
import time
from copy import deepcopy
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.experiments.sweep import LASER_RANKS, Cell, sweep_model
from fasttrunc.families import expand_matrices
from fasttrunc.ranks import resolve_rank, validate_rank_spec
from fasttrunc.runs import Progress, ResultMixin, parse_dtype, report, resolve_device, synchronize
from fasttrunc.selection import metric_value
from fasttrunc.svd import check_method
from fasttrunc.tasks.metrics import EncodedPrompts, Scores, aggregate
from fasttrunc.truncation import Targets, resolve_targets

# Pythia-1.4b (PAPER.md section 3).
PYTHIA_1_4B = {"num_layers": 24, "hidden_size": 2048, "num_heads": 16, "intermediate_size": 8192, "vocab_size": 50304}


@dataclasses.dataclass(frozen=True)
class SweepBenchConfig:
    num_layers: int = PYTHIA_1_4B["num_layers"]
    hidden_size: int = PYTHIA_1_4B["hidden_size"]
    num_heads: int = PYTHIA_1_4B["num_heads"]
    intermediate_size: int = PYTHIA_1_4B["intermediate_size"]
    vocab_size: int = PYTHIA_1_4B["vocab_size"]
    matrices: tuple[str, ...] = ("mlp_in", "mlp_out")
    ranks: tuple[float, ...] = LASER_RANKS
    n_prompts: int = 200
    prompt_len: int = 16  # IOI prompts are 15-20 GPT-NeoX tokens
    batch_size: int = 50  # 4 forwards per cell; the same for both paths
    dtype: str = "bfloat16"
    method: str = "exact"
    device: str = "cuda"
    seed: int = 0
    search: str = "exhaustive"
    keep: int | None = None
    baselines: bool = True  # time the recipe and LASER as shipped (the slow part)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "batch_size", "prompt_len"):
            checks.positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                "allowed: a hidden size the heads divide"
            )
        checks.integer("vocab_size", self.vocab_size, 254)  # the prompts score token 253, " the"
        checks.integer("n_prompts", self.n_prompts, 2)  # selection and report prompts
        matrices = checks.non_empty("matrices", self.matrices)
        for matrix in matrices:
            expand_matrices(checks.text("matrix", matrix))
        ranks = checks.non_empty("ranks", self.ranks)
        for rank in ranks:
            validate_rank_spec(rank)
        object.__setattr__(self, "matrices", tuple(matrices))
        object.__setattr__(self, "ranks", tuple(ranks))
        parse_dtype(self.dtype)
        check_method(self.method)
        resolve_device(self.device)
        checks.seed("seed", self.seed)
        checks.choice("search", self.search, ("exhaustive", "screened"))


@dataclasses.dataclass
class SweepBenchResult(ResultMixin):
    config: SweepBenchConfig
    device: str
    cells: int
    cells_evaluated: int  # exactly (fewer than cells for a screened search)
    fasttrunc_seconds: float
    fasttrunc_svd_seconds: float
    fasttrunc_eval_seconds: float
    floor_seconds: float  # the suffix forwards of every cell, nothing else
    recipe_seconds: float | None
    laser_shipped_seconds: float | None
    floor_ratio: float  # fasttrunc / floor
    recipe_speedup: float | None  # recipe / fasttrunc
    laser_shipped_speedup: float | None
    max_abs_diff_p_correct_recipe: float | None  # fasttrunc vs the recipe, over evaluated cells
    max_abs_diff_p_correct_shipped: float | None
    best_cell: list[Any]
    exhaustive_best_cell: list[Any] | None  # screened search: the best cell of the floor's exhaustive pass
    best_matches_exhaustive: bool | None

    @property
    def laser_seconds(self) -> float | None:
        """The per-cell recipe's seconds (its name before the floor and LASER as shipped were timed)."""
        return self.recipe_seconds

    @property
    def max_abs_diff_p_correct(self) -> float | None:
        return self.max_abs_diff_p_correct_recipe


def _model(config: SweepBenchConfig, device: torch.device) -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf = GPTNeoXConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        use_parallel_residual=True,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    torch.manual_seed(config.seed)
    with torch.device(device):
        model: Any = GPTNeoXForCausalLM(hf)
    return model.to(parse_dtype(config.dtype)).eval()


def _prompts(config: SweepBenchConfig) -> EncodedPrompts:
    g = torch.Generator().manual_seed(config.seed)
    shape = (config.n_prompts, config.prompt_len)
    return EncodedPrompts(
        input_ids=torch.randint(0, config.vocab_size, shape, generator=g),
        attention_mask=torch.ones(shape, dtype=torch.long),
        last_index=torch.full((config.n_prompts,), config.prompt_len - 1),
        answer_ids=torch.randint(0, config.vocab_size, (config.n_prompts,), generator=g),
        subject_ids=torch.randint(0, config.vocab_size, (config.n_prompts,), generator=g),
        the_id=253,  # " the" under the GPT-NeoX tokenizer
    )


@torch.no_grad()
def _laser_scores(model: Any, enc: EncodedPrompts, batch_size: int) -> Scores:
    """The Hugging Face forward with full logits, read at the last position."""
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(enc), batch_size):
        ids = enc.input_ids[start : start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=enc.attention_mask[start : start + batch_size].to(device)).logits
        parts.append(logits[:, -1].float().cpu())
    logits = torch.cat(parts)
    logp = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(enc))
    return Scores(
        p_correct=logp[rows, enc.answer_ids].exp(),
        p_the=logp[:, enc.the_id].exp(),
        p_subject=logp[rows, enc.subject_ids].exp(),
        logit_diff=logits[rows, enc.answer_ids] - logits[rows, enc.subject_ids],
        top1=logits.argmax(-1) == enc.answer_ids,
    )


def _cells(config: SweepBenchConfig) -> list[tuple[int, str, float]]:
    return [(layer, m, r) for layer in range(config.num_layers) for m in config.matrices for r in config.ranks]


def _recipe(model: Any, enc: EncodedPrompts, config: SweepBenchConfig, progress: Progress) -> tuple[float, list[float]]:
    """The per-cell recipe; returns (seconds, mean P(correct) per cell)."""
    device = next(model.parameters()).device
    seconds = 0.0
    p_correct: list[float] = []
    cells = _cells(config)
    for done, (layer, matrix, rank) in enumerate(cells):
        synchronize(device)
        t0 = time.perf_counter()
        saved = {}
        with torch.no_grad():
            for name in resolve_targets(model, Targets(layers=[layer], matrices=matrix)):
                weight = model.get_submodule(name).weight
                saved[name] = weight.detach().clone()
                _write_lowrank(weight, rank)
        scores = _laser_scores(model, enc, config.batch_size)
        with torch.no_grad():
            for name, original in saved.items():
                model.get_submodule(name).weight.copy_(original)
        synchronize(device)
        seconds += time.perf_counter() - t0
        p_correct.append(aggregate(scores).mean_p_correct)
        report(progress, "recipe", done + 1, len(cells))
    return seconds, p_correct


def _write_lowrank(weight: torch.Tensor, rank: float) -> None:
    """LASER's edit: the randomized rank-k approximation (niter=2) written into ``weight``."""
    k = resolve_rank(rank, *weight.shape)
    if k == 0:
        weight.zero_()
        return
    u, s, v = torch.svd_lowrank(weight.float(), q=k, niter=2)
    weight.copy_(((u * s) @ v.T).to(weight.dtype))


def _shipped(
    model: Any, enc: EncodedPrompts, config: SweepBenchConfig, progress: Progress
) -> tuple[float, list[float]]:
    """LASER as shipped: per cell deepcopy on the CPU, CPU fp32 SVD, move, prompts one at a time."""
    device = next(model.parameters()).device
    cpu_model = deepcopy(model).to("cpu")
    seconds = 0.0
    p_correct: list[float] = []
    cells = _cells(config)
    for done, (layer, matrix, rank) in enumerate(cells):
        synchronize(device)
        t0 = time.perf_counter()
        edited = deepcopy(cpu_model)
        with torch.no_grad():
            for name in resolve_targets(edited, Targets(layers=[layer], matrices=matrix)):
                _write_lowrank(edited.get_submodule(name).weight, rank)
        edited = edited.to(device)
        scores = _laser_scores(edited, enc, 1)
        del edited
        synchronize(device)
        seconds += time.perf_counter() - t0
        p_correct.append(aggregate(scores).mean_p_correct)
        report(progress, "laser shipped", done + 1, len(cells))
    return seconds, p_correct


def _floor(
    model: Any, enc: EncodedPrompts, splits: dict[str, int], config: SweepBenchConfig
) -> tuple[float, list[Cell]]:
    """Only the suffix forwards of every cell timed: edits and prefixes prepared beforehand."""
    from fasttrunc.experiments.prefix import PrefixCache
    from fasttrunc.experiments.sweep import _edit, _metrics
    from fasttrunc.truncation import factorize

    device = next(model.parameters()).device
    n = splits["ioi"]
    sets = [enc.rows(0, n), enc.rows(n, None)]
    cache = PrefixCache.for_model(model, config.batch_size)
    cache.capture(sets, list(range(config.num_layers)))
    cells = _cells(config)
    ks_of = {}
    for layer, matrix, rank in cells:
        names = resolve_targets(model, Targets(layers=[layer], matrices=matrix))
        ks_of[(layer, matrix, rank)] = {
            name: resolve_rank(rank, *model.get_submodule(name).weight.shape) for name in names
        }
    max_ranks: dict[str, int] = {}
    for ks in ks_of.values():
        for name, k in ks.items():
            max_ranks[name] = max(max_ranks.get(name, 0), k)
    factors = factorize(model, lambda name, _: name in max_ranks, max_ranks, method=config.method)
    seconds = 0.0
    out: list[Cell] = []
    for key, ks in ks_of.items():
        edit, form = _edit(model, ks, factors, config.method)
        with edit:
            synchronize(device)
            t0 = time.perf_counter()
            scores = cache.score(key[0], sets)
            synchronize(device)
            seconds += time.perf_counter() - t0
        select, reported = _metrics(["ioi"], scores)
        out.append(Cell(key[0], key[1], key[2], ks, select, reported, form=form))
    return seconds, out


def _key(cell: Cell) -> list[Any]:
    return [cell.layer, cell.matrix, cell.rank]


def _mean_p_correct(cell: Cell, n_select: int, n_report: int) -> float:
    sel, rep = metric_value(cell.select["ioi"], "mean_p_correct"), metric_value(cell.report["ioi"], "mean_p_correct")
    return (sel * n_select + rep * n_report) / (n_select + n_report)


def run(config: SweepBenchConfig | None = None, progress: Progress = None) -> SweepBenchResult:
    config = config or SweepBenchConfig()
    device = resolve_device(config.device)
    model = _model(config, device)
    enc = _prompts(config)
    n_select = max(1, round(0.2 * config.n_prompts))
    n_report = config.n_prompts - n_select
    splits = {"ioi": n_select}
    # Warm-up: one forward per path, so none pays first-call costs inside its timing.
    _laser_scores(model, enc, config.batch_size)
    sweep_model(model, {"ioi": enc}, splits, [0], config.matrices[:1], config.ranks[-1:], batch_size=config.batch_size)
    synchronize(device)
    t0 = time.perf_counter()
    grid = sweep_model(
        model,
        {"ioi": enc},
        splits,
        list(range(config.num_layers)),
        config.matrices,
        config.ranks,
        method=config.method,
        batch_size=config.batch_size,
        progress=progress,
        label=" fasttrunc",
        search=config.search,
        keep=config.keep,
    )
    synchronize(device)
    ft_seconds = time.perf_counter() - t0
    floor_seconds, exhaustive = _floor(model, enc, splits, config)
    evaluated = [c for c in grid.cells if c.evaluated]

    def select(c: Cell) -> float:
        return metric_value(c.select["ioi"], "mean_p_correct")

    best = max(evaluated, key=select)
    exhaustive_best = max(exhaustive, key=select)
    recipe_s = shipped_s = diff_recipe = diff_shipped = None
    if config.baselines:
        recipe_s, recipe_p = _recipe(model, enc, config, progress)
        shipped_s, shipped_p = _shipped(model, enc, config, progress)
        ours = {tuple(_key(c)): _mean_p_correct(c, n_select, n_report) for c in evaluated}
        keys = [tuple(k) for k in _cells(config)]
        diff_recipe = max(abs(ours[k] - p) for k, p in zip(keys, recipe_p) if k in ours)
        diff_shipped = max(abs(ours[k] - p) for k, p in zip(keys, shipped_p) if k in ours)
    return SweepBenchResult(
        config=config,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        cells=len(grid.cells),
        cells_evaluated=len(evaluated),
        fasttrunc_seconds=ft_seconds,
        fasttrunc_svd_seconds=grid.svd_seconds,
        fasttrunc_eval_seconds=grid.eval_seconds,
        floor_seconds=floor_seconds,
        recipe_seconds=recipe_s,
        laser_shipped_seconds=shipped_s,
        floor_ratio=ft_seconds / floor_seconds,
        recipe_speedup=None if recipe_s is None else recipe_s / ft_seconds,
        laser_shipped_speedup=None if shipped_s is None else shipped_s / ft_seconds,
        max_abs_diff_p_correct_recipe=diff_recipe,
        max_abs_diff_p_correct_shipped=diff_shipped,
        best_cell=_key(best),
        exhaustive_best_cell=_key(exhaustive_best),
        best_matches_exhaustive=_key(best) == _key(exhaustive_best),
    )


def summary_rows(result: SweepBenchResult) -> list[list[Any]]:
    def row(name: str, seconds: float | None, vs: str) -> list[Any]:
        return [name, "-" if seconds is None else f"{seconds:.2f}", vs]

    ft = result.fasttrunc_seconds
    return [
        row("fasttrunc", ft, f"{result.floor_ratio:.2f}x the floor"),
        row("floor (suffix forwards only)", result.floor_seconds, ""),
        row(
            "per-cell recipe",
            result.recipe_seconds,
            "" if result.recipe_speedup is None else f"{result.recipe_speedup:.1f}x fasttrunc",
        ),
        row(
            "LASER as shipped",
            result.laser_shipped_seconds,
            "" if result.laser_shipped_speedup is None else f"{result.laser_shipped_speedup:.1f}x fasttrunc",
        ),
    ]
