"""Noisy in-context recall (PAPER.md 1a): train the two-layer toy transformer, then truncate its FFs.

The model is trained on sequences where the token after each trigger is the sequence's answer
ybar with probability 1 - alpha and a fixed noise token with probability alpha, on the paper's
tiny-Shakespeare statistics or the synthetic stand-in (``data``, see fasttrunc.tasks.recall). It
is evaluated on clean sequences (alpha = 0) at trigger positions that follow an earlier trigger:
as it is, with each FF matrix (FF1/FF2 x W1/W2) truncated to rank int(rho * d) through
``truncate_``, and with the second block's attention value and output maps truncated (Wv, Wo,
and their product Wo Wv as one matrix), as the paper's code does. With ``track_every`` the
training dynamics are recorded as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from fasttrunc import checks
from fasttrunc.linear import TruncatedLinear
from fasttrunc.models.toy import UNEMBED_INITS, Attention, Block, ToyTransformer
from fasttrunc.runs import Progress, ResultMixin, cpu_threads, report, resolve_device
from fasttrunc.tasks.recall import DATA, MarkovChain, RecallBatch, chain_for, sample_batch
from fasttrunc.training import OptimConfig, TrainHistory, check_steps, train
from fasttrunc.truncation import Targets, truncate_

# (label, layer, matrix alias) of the FF matrices the evaluation grid truncates.
FF_MATRICES = (("FF1 W1", 0, "mlp_in"), ("FF1 W2", 0, "mlp_out"), ("FF2 W1", 1, "mlp_in"), ("FF2 W2", 1, "mlp_out"))
# The second block's attention, as the paper's code truncates it: Wv and Wo one at a time, and
# the product Wo Wv as one matrix (PRODUCT: its rank-r approximation replaces both).
ATTN_MATRICES = (("Attn2 Wv", 1, "attn_v"), ("Attn2 Wo", 1, "attn_out"))
PRODUCT = "Attn2 WoWv"
GRID_MATRICES = tuple(label for label, _, _ in FF_MATRICES + ATTN_MATRICES) + (PRODUCT,)
RHOS = (0.0, 0.1, 0.2, 0.5, 1.0)

# The effect the experiment exists to show (issue 2): removing FF2 lowers mean P(noise) by at
# least this much and lifts clean accuracy to at least this value, while the full model is clearly
# worse (accuracy lower by at least CLEARLY_WORSE, 0.2: well beyond the seed-to-seed spread of the
# full model's accuracy, 0.49-0.63 over seeds 0-3).
MIN_P_NOISE_DROP = 0.3
MIN_ACCURACY_WITHOUT_FF2 = 0.95
CLEARLY_WORSE = 0.2

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized (the default): the synthetic 32-token chain (the in-context mechanism needs O(N)
    # samples), the N(0, 1/d) unembedding, d 64, T 64, batch 64 and 300 SGD steps at the paper's
    # lr 0.03: on a 2-core CPU the effect is complete (accuracy without FF2 > 0.95) by step ~250,
    # and the run takes well under a minute.
    "quick": dict(
        data="synthetic",
        init="normal",
        n_tokens=32,
        d_model=64,
        d_ff=256,
        seq_len=64,
        batch_size=64,
        steps=300,
        alpha=0.5,
        eval_sequences=256,
    ),
    # The paper's data and init at the CPU sizes of `quick`: tiny Shakespeare (65 characters) and
    # U(+-1/sqrt(d)); they learn more slowly, so 1000 steps (a few minutes on a 2-core CPU).
    "paper-small": dict(
        data="shakespeare",
        init="paper",
        d_model=64,
        d_ff=256,
        seq_len=64,
        batch_size=64,
        steps=1000,
        alpha=0.5,
        eval_sequences=256,
    ),
    # PAPER.md 1a and the paper's script: tiny Shakespeare, U(+-1/sqrt(d)), d 256, FF 1024, T 256,
    # batch 512, 5000 steps, alpha 0.5 (for a GPU).
    "paper": dict(
        data="shakespeare",
        init="paper",
        d_model=256,
        d_ff=1024,
        seq_len=256,
        batch_size=512,
        steps=5000,
        alpha=0.5,
        eval_sequences=1024,
    ),
}


@dataclass(frozen=True)
class RecallConfig:
    """One run. ``preset`` names the defaults the other fields were taken from (see :data:`PRESETS`)."""

    preset: str = "quick"
    data: str = "synthetic"  # or "shakespeare" (the paper's); see fasttrunc.tasks.recall
    init: str = "normal"  # the unembedding's: "normal" N(0, 1/d) or "paper" U(+-1/sqrt(d)); see fasttrunc.models.toy
    n_tokens: int = 32  # ordinary tokens of the synthetic chain (tiny Shakespeare has its own 65)
    d_model: int = 64
    d_ff: int = 256
    seq_len: int = 64
    batch_size: int = 64
    steps: int = 300
    alpha: float = 0.5
    optimizer: str = "sgd"
    lr: float = 0.03  # the paper's SGD learning rate, momentum 0.9, weight decay 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_sequences: int = 256  # ~2000 trigger positions: accuracy's standard error ~0.01
    rhos: tuple[float, ...] = RHOS
    seed: int = 0
    device: str = "cpu"
    track_every: int | None = None
    track_sequences: int = 128  # clean sequences per tracking point (~1000 trigger positions at T 64)
    # Intra-op threads while running on a CPU (restored afterwards). The quick preset's matrices are
    # tiny: on a 2-core CPU shared with other jobs, 1 thread trained 3.6x faster than 2 (measured).
    cpu_threads: int = 1

    @classmethod
    def from_preset(cls, preset: str = "quick", **overrides: Any) -> RecallConfig:
        """The preset's values, with every override that is not None."""
        values = {
            **PRESETS[checks.choice("preset", preset, PRESETS)],
            **{k: v for k, v in overrides.items() if v is not None},
        }
        return cls(preset=preset, **values)

    def __post_init__(self) -> None:
        checks.choice("preset", self.preset, PRESETS)
        checks.choice("data", self.data, DATA)
        checks.choice("init", self.init, UNEMBED_INITS)
        checks.fraction("alpha", self.alpha)
        check_steps(self.steps, self.track_every)
        checks.integer("n_tokens", self.n_tokens, 3)  # the trigger, the noise token and at least one answer
        checks.integer("seq_len", self.seq_len, 2)  # a trigger and the token after it
        for name in ("d_model", "d_ff", "batch_size", "eval_sequences", "track_sequences", "cpu_threads"):
            checks.positive(name, getattr(self, name))
        checks.seed("seed", self.seed)
        rhos = tuple(checks.fraction("rho", rho) for rho in checks.non_empty("rhos", self.rhos))
        object.__setattr__(self, "rhos", rhos)
        self.optim()
        resolve_device(self.device)

    def optim(self) -> OptimConfig:
        return OptimConfig(self.optimizer, self.lr, self.momentum, self.weight_decay)


@dataclass(frozen=True)
class RecallMetrics:
    """Metrics at the evaluated trigger positions (see :func:`evaluate`)."""

    accuracy: float
    p_answer: float
    p_noise: float
    ff2_probe_embedding: float
    ff2_probe_residual: float
    attention_mass: float


@dataclass(frozen=True)
class RecallCell:
    """One cell of the truncation grid: one FF matrix at one rho."""

    matrix: str  # one of GRID_MATRICES: FF1 W1 ... FF2 W2, Attn2 Wv, Attn2 Wo, Attn2 WoWv
    module: str  # its qualified name in the model (the product: both names, joined by " @ ")
    rho: float
    rank: int
    metrics: RecallMetrics


@dataclass(frozen=True)
class TrainSummary:
    """Mean loss over the first and the last 20 steps, the steps taken and the training time."""

    loss_first: float
    loss_last: float
    steps: int
    seconds: float


@dataclass(frozen=True)
class Criteria:
    """What counts as the effect being shown (see the constants of this module)."""

    min_p_noise_drop: float = MIN_P_NOISE_DROP
    min_accuracy_without_ff2: float = MIN_ACCURACY_WITHOUT_FF2
    full_model_accuracy_lower_by: float = CLEARLY_WORSE


@dataclass(frozen=True)
class Effect:
    """Removing FF2 against the full model, and whether that meets :class:`Criteria`."""

    p_noise_full: float
    p_noise_without_ff2: float
    p_noise_drop: float
    accuracy_full: float
    accuracy_without_ff2: float
    criteria: Criteria
    shown: bool


V = TypeVar("V")


@dataclass(frozen=True)
class Tracked(Generic[V]):
    """One value per tracked quantity: a measurement (floats), a curve (lists) or when each appears.

    ``_full``: the model as it is; ``_no_ff2``: with FF2 removed. ``ff2_noise_share``: P(noise)
    minus P(noise) without FF2. ``ff2_probe_embedding``, ``ff2_probe_residual`` and
    ``attention_mass``: as in :func:`evaluate`.
    """

    accuracy_full: V
    accuracy_no_ff2: V
    p_noise_full: V
    p_noise_no_ff2: V
    ff2_noise_share: V
    ff2_probe_embedding: V
    ff2_probe_residual: V
    attention_mass: V


TRACKED = tuple(f.name for f in dataclasses.fields(Tracked))

DYNAMICS_DEFINITION = (
    "a metric appears at the first tracked step where it has risen half of the way from its value at "
    "step 0 to its final value (a metric that ends lower than it started never appears); FF2's noise "
    "association is ff2_noise_share = P(noise) of the full model minus P(noise) with FF2 removed, the "
    "in-context mechanism is attention_mass"
)


@dataclass(frozen=True)
class Dynamics:
    """The tracked curves, lined up with ``steps``, and the step at which each appears."""

    steps: list[int]
    series: Tracked[list[float]]
    appears: Tracked[int | None]
    ff2_noise_before_in_context: bool | None
    definition: str = DYNAMICS_DEFINITION


@dataclass
class RecallResult(ResultMixin):
    """Metrics at trigger positions of clean test data; ``cells`` holds one row per (matrix, rho)."""

    config: RecallConfig
    data: str
    n_eval_positions: int
    train: TrainSummary
    full: RecallMetrics
    cells: list[RecallCell]
    effect: Effect
    dynamics: Dynamics | None = None
    seconds: float = 0.0


def _noise_margin(logits: torch.Tensor, noise_token: int) -> torch.Tensor:
    """The noise logit minus the largest other logit, per row."""
    others = logits.clone()
    others[:, noise_token] = float("-inf")
    return logits[:, noise_token] - others.max(dim=-1).values


def evaluate(model: ToyTransformer, batch: RecallBatch, noise_token: int, trigger: int) -> RecallMetrics:
    """Accuracy of ybar, mean P(ybar), mean P(noise), the two FF2 probes and layer-2 attention mass.

    All at the masked positions (trigger with an earlier trigger). Both probes read FF2 alone
    through the unembedding as the noise logit minus the largest other logit:
    ``ff2_probe_embedding`` (the paper's probe) applies FF2 to the trigger's raw token embedding,
    one number per model; ``ff2_probe_residual`` applies it to the residual stream entering FF2 at
    each position, averaged. ``attention_mass``: layer-2 attention from the trigger's query onto
    positions right after earlier triggers (where ybar sits), averaged.
    """
    capture: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = model(batch.inputs, capture, keep=batch.mask)
        probs = logits.float().softmax(dim=-1)
        answers = batch.answers[:, None].expand_as(batch.mask)[batch.mask]
        last = len(model.blocks) - 1
        ff2 = cast(Block, model.blocks[last]).ff
        residual = _noise_margin(model.logits_of(ff2(capture[f"blocks.{last}.ff_in"])).float(), noise_token)
        embedding = _noise_margin(model.logits_of(ff2(model.embed[trigger : trigger + 1])).float(), noise_token)
        after_trigger = torch.zeros_like(batch.mask)
        after_trigger[:, 1:] = batch.inputs[:, :-1] == trigger
        attn = capture[f"blocks.{last}.attn"]
        mass = (attn * after_trigger[:, None, :]).sum(dim=-1)[batch.mask]
    return RecallMetrics(
        accuracy=float((probs.argmax(dim=-1) == answers).float().mean()),
        p_answer=float(probs.gather(1, answers[:, None]).mean()),
        p_noise=float(probs[:, noise_token].mean()),
        ff2_probe_embedding=float(embedding[0]),
        ff2_probe_residual=float(residual.mean()),
        attention_mass=float(mass.mean()),
    )


def evaluate_without_ff2(model: ToyTransformer, batch: RecallBatch, noise_token: int, trigger: int) -> RecallMetrics:
    """:func:`evaluate` with FF2 removed: rank 0 on its W2 (no bias, so FF2's output is zero)."""
    with truncate_(model, Targets(layers=-1, matrices="mlp_out"), rank=0):
        return evaluate(model, batch, noise_token, trigger)


@contextlib.contextmanager
def truncate_value_output(model: ToyTransformer, layer: int, rank: float) -> Iterator[TruncatedLinear]:
    """Block ``layer``'s attention with Wo Wv replaced by its rank ``int(rank * d)`` approximation.

    The product is one d x d matrix; its exact truncated SVD is written back as factors: ``wo``
    becomes a :class:`TruncatedLinear` of the product and ``wv`` the identity (the value path is
    then ``x -> U_r S_r V_r^T x``), as the paper's code does. The original modules come back on
    exit, whatever happens inside.
    """
    attn: Attention = cast(Block, model.blocks[layer]).attn
    wv, wo = attn.wv, attn.wo
    with torch.no_grad():
        product = nn.Linear(wv.in_features, wo.out_features, bias=False).to(wv.weight)
        product.weight.copy_(wo.weight @ wv.weight)
    low = TruncatedLinear.from_linear(product, rank)
    try:
        attn.wv, attn.wo = nn.Identity(), low  # type: ignore[assignment]
        yield low
    finally:
        attn.wv, attn.wo = wv, wo


def first_crossing(steps: list[int], values: list[float], fraction: float = 0.5) -> int | None:
    """The first step where a rising series has covered ``fraction`` of its rise from first to last value.

    None when the series does not end above where it started: nothing appeared.
    """
    if len(steps) != len(values) or not values:
        raise ValueError(f"steps ({len(steps)}) and values ({len(values)}) must be non-empty and of one length")
    start, end = values[0], values[-1]
    if not end > start:
        return None
    target = start + fraction * (end - start)
    return next(step for step, value in zip(steps, values) if value >= target)


def _loss(model: ToyTransformer, batch: RecallBatch) -> torch.Tensor:
    logits = model(batch.inputs, keep=batch.mask)
    targets = batch.targets[batch.mask]
    # Mean over trigger positions; a batch without one contributes zero loss (sum over nothing).
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(int(targets.numel()), 1)


def _dynamics(history: TrainHistory[Tracked[float]]) -> Dynamics:
    steps = list(history.track_steps)
    series = Tracked[list[float]](**{name: [getattr(t, name) for t in history.tracked] for name in TRACKED})
    appears = Tracked[int | None](**{name: first_crossing(steps, getattr(series, name)) for name in TRACKED})
    ff2, attn = appears.ff2_noise_share, appears.attention_mass
    return Dynamics(
        steps=steps,
        series=series,
        appears=appears,
        ff2_noise_before_in_context=None if ff2 is None or attn is None else ff2 < attn,
    )


def run(config: RecallConfig, progress: Progress = None) -> RecallResult:
    """Train, evaluate the truncation grid, and (with ``track_every``) record the dynamics."""
    device = resolve_device(config.device)
    with cpu_threads(config.cpu_threads, device):
        return _run(config, device, progress)


def _run(config: RecallConfig, device: torch.device, progress: Progress) -> RecallResult:
    started = time.perf_counter()
    chain: MarkovChain = chain_for(config.data, config.n_tokens, config.seed)
    noise, trigger = chain.noise, chain.trigger
    model = ToyTransformer(
        chain.vocab_size, config.d_model, config.d_ff, config.seq_len, seed=config.seed, unembed_init=config.init
    ).to(device)

    # Independent streams for training data, test data and tracking data, all from the seed.
    train_gen = torch.Generator().manual_seed(config.seed * 1000 + 1)
    test = sample_batch(
        chain, config.eval_sequences, config.seq_len, 0.0, torch.Generator().manual_seed(config.seed * 1000 + 2)
    ).to(device)
    track_batch = None
    if config.track_every is not None:
        track_batch = sample_batch(
            chain, config.track_sequences, config.seq_len, 0.0, torch.Generator().manual_seed(config.seed * 1000 + 3)
        ).to(device)

    def loss_at(step: int) -> torch.Tensor:
        return _loss(model, sample_batch(chain, config.batch_size, config.seq_len, config.alpha, train_gen).to(device))

    def track(step: int) -> Tracked[float]:
        assert track_batch is not None
        full = evaluate(model, track_batch, noise, trigger)
        removed = evaluate_without_ff2(model, track_batch, noise, trigger)
        return Tracked(
            accuracy_full=full.accuracy,
            accuracy_no_ff2=removed.accuracy,
            p_noise_full=full.p_noise,
            p_noise_no_ff2=removed.p_noise,
            ff2_noise_share=full.p_noise - removed.p_noise,
            ff2_probe_embedding=full.ff2_probe_embedding,
            ff2_probe_residual=full.ff2_probe_residual,
            attention_mass=full.attention_mass,
        )

    train_started = time.perf_counter()
    history = train(
        model,
        loss_at,
        steps=config.steps,
        optim=config.optim(),
        progress=progress,
        stage="training",
        track=track if track_batch is not None else None,
        track_every=config.track_every,
    )
    loss_first, loss_last = history.loss_summary()
    trained = TrainSummary(loss_first, loss_last, config.steps, time.perf_counter() - train_started)

    full = evaluate(model, test, noise, trigger)
    cells = _grid(model, test, noise, trigger, config.rhos, progress)
    # Rank 0 of FF2's W2 is a grid cell when 0 is among the rhos; otherwise it is measured here.
    zero = [c.metrics for c in cells if c.matrix == "FF2 W2" and c.rho == 0.0]
    removed = zero[0] if zero else evaluate_without_ff2(model, test, noise, trigger)
    drop = full.p_noise - removed.p_noise
    criteria = Criteria()
    effect = Effect(
        p_noise_full=full.p_noise,
        p_noise_without_ff2=removed.p_noise,
        p_noise_drop=drop,
        accuracy_full=full.accuracy,
        accuracy_without_ff2=removed.accuracy,
        criteria=criteria,
        shown=bool(
            drop >= criteria.min_p_noise_drop
            and removed.accuracy >= criteria.min_accuracy_without_ff2
            and removed.accuracy - full.accuracy >= criteria.full_model_accuracy_lower_by
        ),
    )
    return RecallResult(
        config=config,
        data=chain.describe(),
        n_eval_positions=int(test.mask.sum()),
        train=trained,
        full=full,
        cells=cells,
        effect=effect,
        dynamics=_dynamics(history) if track_batch is not None else None,
        seconds=time.perf_counter() - started,
    )


def _grid(
    model: ToyTransformer, test: RecallBatch, noise: int, trigger: int, rhos: tuple[float, ...], progress: Progress
) -> list[RecallCell]:
    """Every matrix of :data:`GRID_MATRICES` at every rho, each cell restored after it is measured."""
    cells: list[RecallCell] = []
    total = len(GRID_MATRICES) * len(rhos)
    for label, layer, alias in FF_MATRICES + ATTN_MATRICES:
        for rho in rhos:
            with truncate_(model, Targets(layers=layer, matrices=alias), rank=rho) as truncation:
                ((name, module),) = truncation.items()
                assert isinstance(module, TruncatedLinear)
                metrics = evaluate(model, test, noise, trigger)
            cells.append(RecallCell(matrix=label, module=name, rho=rho, rank=module.rank, metrics=metrics))
            report(progress, "truncating", len(cells), total)
    last = len(model.blocks) - 1
    for rho in rhos:
        with truncate_value_output(model, last, rho) as low:
            metrics = evaluate(model, test, noise, trigger)
        product = f"blocks.{last}.attn.wo @ blocks.{last}.attn.wv"
        cells.append(RecallCell(matrix=PRODUCT, module=product, rho=rho, rank=low.rank, metrics=metrics))
        report(progress, "truncating", len(cells), total)
    return cells
