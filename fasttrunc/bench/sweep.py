"""A LASER sweep on a Pythia-1.4b-shaped GPT-NeoX: fasttrunc against LASER's own recipe (CUDA).

The model is built from its config with random weights (timing does not depend on them) in
bf16; the prompts are random token ids of IOI length. Both paths sweep the same grid (every
layer x {mlp_in, mlp_out} x LASER's 9 rhos by default), score the same prompts with the same
batch size, and are timed in the same run on the same card:

- ``fasttrunc``: :func:`fasttrunc.experiments.sweep.sweep_model`: each matrix factorized once
  (``factorize``, batched), every cell truncated by ``truncate_`` from the sliced factors
  (``TruncatedLinear``, so the low-rank kernel when it is there) and restored; the head is
  applied at the last positions only;
- ``laser``: for each cell ``torch.svd_lowrank(W.float(), q=rank, niter=2)``, write
  ``U diag(S) V^T`` into the dense weight, run the Hugging Face forward (full logits), restore
  the weight from a saved copy.

The metrics of both paths are compared cell by cell (the randomized SVD of the LASER recipe is
approximate, so they agree closely, not exactly).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.experiments.sweep import LASER_RANKS, Cell, sweep_model
from fasttrunc.families import expand_matrices
from fasttrunc.ranks import resolve_rank, validate_rank_spec
from fasttrunc.runs import Progress, ResultMixin, parse_dtype, report, resolve_device, synchronize
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


@dataclasses.dataclass
class SweepBenchResult(ResultMixin):
    config: SweepBenchConfig
    device: str
    cells: int
    fasttrunc_seconds: float
    fasttrunc_svd_seconds: float
    fasttrunc_eval_seconds: float
    laser_seconds: float
    laser_svd_seconds: float
    laser_eval_seconds: float
    speedup: float
    max_abs_diff_p_correct: float  # between the two paths, over cells (selection + report prompts)


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


def _laser(
    model: Any, enc: EncodedPrompts, config: SweepBenchConfig, device: torch.device, progress: Progress
) -> tuple[float, float, list[float]]:
    """LASER's per-cell recipe; returns (svd seconds, eval seconds, mean P(correct) per cell)."""
    svd_s = eval_s = 0.0
    p_correct: list[float] = []
    cells = [(layer, m, r) for layer in range(config.num_layers) for m in config.matrices for r in config.ranks]
    for done, (layer, matrix, rank) in enumerate(cells):
        synchronize(device)
        t0 = time.perf_counter()
        saved = {}
        with torch.no_grad():
            for name in resolve_targets(model, Targets(layers=[layer], matrices=matrix)):
                weight = model.get_submodule(name).weight
                saved[name] = weight.detach().clone()
                k = resolve_rank(rank, *weight.shape)
                if k == 0:
                    weight.zero_()
                    continue
                u, s, v = torch.svd_lowrank(weight.float(), q=k, niter=2)
                weight.copy_(((u * s) @ v.T).to(weight.dtype))
        synchronize(device)
        t1 = time.perf_counter()
        scores = _laser_scores(model, enc, config.batch_size)
        with torch.no_grad():
            for name, original in saved.items():
                model.get_submodule(name).weight.copy_(original)
        synchronize(device)
        t2 = time.perf_counter()
        svd_s += t1 - t0
        eval_s += t2 - t1
        p_correct.append(aggregate(scores).mean_p_correct)
        report(progress, "laser recipe", done + 1, len(cells))
    return svd_s, eval_s, p_correct


def _mean_p_correct(cell: Cell, n_select: int, n_report: int) -> float:
    sel, rep = cell.select["ioi"], cell.report["ioi"]
    return (sel.mean_p_correct * n_select + rep.mean_p_correct * n_report) / (n_select + n_report)


def run(config: SweepBenchConfig | None = None, progress: Progress = None) -> SweepBenchResult:
    config = config or SweepBenchConfig()
    device = resolve_device(config.device)
    model = _model(config, device)
    enc = _prompts(config)
    n_select = max(1, round(0.2 * config.n_prompts))
    splits = {"ioi": n_select}
    # Warm-up: one forward per path, so neither pays first-call costs (kernel compilation, cuBLAS
    # handles) inside its timing.
    _laser_scores(model, enc, config.batch_size)
    sweep_model(
        model,
        {"ioi": enc},
        splits,
        [0],
        config.matrices[:1],
        config.ranks[-1:],
        method=config.method,
        batch_size=config.batch_size,
    )
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
    )
    synchronize(device)
    ft_seconds = time.perf_counter() - t0
    laser_svd, laser_eval, laser_p = _laser(model, enc, config, device, progress)
    ours = [_mean_p_correct(c, n_select, config.n_prompts - n_select) for c in grid.cells]
    laser_total = laser_svd + laser_eval
    return SweepBenchResult(
        config=config,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        cells=len(grid.cells),
        fasttrunc_seconds=ft_seconds,
        fasttrunc_svd_seconds=grid.svd_seconds,
        fasttrunc_eval_seconds=grid.eval_seconds,
        laser_seconds=laser_total,
        laser_svd_seconds=laser_svd,
        laser_eval_seconds=laser_eval,
        speedup=laser_total / ft_seconds,
        max_abs_diff_p_correct=max(abs(a - b) for a, b in zip(ours, laser_p)),
    )


def summary_rows(result: SweepBenchResult) -> list[list[Any]]:
    return [
        [
            "fasttrunc",
            f"{result.fasttrunc_svd_seconds:.2f}",
            f"{result.fasttrunc_eval_seconds:.2f}",
            f"{result.fasttrunc_seconds:.2f}",
            "1.0x",
        ],
        [
            "LASER recipe",
            f"{result.laser_svd_seconds:.2f}",
            f"{result.laser_eval_seconds:.2f}",
            f"{result.laser_seconds:.2f}",
            f"{result.speedup:.1f}x slower",
        ],
    ]
