"""Associative memory: where the noise association lives in W, and which truncation removes it.

Trains :class:`fasttrunc.models.memory.AssociativeMemory` from ``W = 0`` by plain SGD on sampled
pairs (or by full-batch gradient descent on the exact expected loss) with the shared loop of
:mod:`fasttrunc.training`, and every ``record_every`` steps records, from one SVD of
W (:func:`fasttrunc.truncated_svd`):

- all singular values of W;
- for each of the top components ``s_i u_i v_i^T``, its *noise share*: the fraction of the mean
  noise margin it carries. The noise margin of input x is the noise token's logit minus the mean
  clean logit, ``(u_noise - mean_j u_j) . W e_x``; averaged over inputs it is ``c . W mu`` with
  ``c = u_noise - mean_j u_j`` and ``mu`` the mean input embedding, and it splits exactly over the
  components as ``s_i (c . u_i)(v_i . mu)``. Shares sum to 1 over all components (NaN while the
  margin is 0, e.g. at W = 0). Also the *alignment* ``|c . u_i| |v_i . mu| / (|c| |mu|)``, the
  cosine between ``u_i v_i^T`` and the direction ``c mu^T`` (sign-free);
- clean-data metrics (accuracy, P(noise), P(f(x)), association accuracy) of W, of W with its top-k
  components removed, and of its top-k components alone, for each k in ``ks``.

Why the noise takes the top component: from W = 0 all logits are equal, so the expected gradient
step is ``lr/N sum_x (E[u_y | x] - mean_j u_j) e_x^T = lr [(1-alpha)/N sum_x u_f(x) e_x^T +
alpha u_noise mu^T - ubar mu^T]``. With near-orthonormal embeddings the clean part has N singular
values ~ ``(1-alpha)/N`` each, while the noise part is rank one with singular value
``~alpha |mu| ~ alpha/sqrt(N)``: ``alpha sqrt(N)/(1-alpha)`` times larger, because one direction
serves every input. With SGD, every noisy sample adds to that same left vector ``u_noise``, so the
direction is in place after a handful of samples, while a clean association ``x -> f(x)`` needs x
itself to be drawn (about N log N samples to see them all).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fasttrunc import checks
from fasttrunc.models.memory import AssociativeMemory, Predictions, prediction_metrics
from fasttrunc.runs import Progress, ResultMixin, cpu_threads, resolve_device
from fasttrunc.svd import truncated_svd
from fasttrunc.training import OptimConfig, train

METRICS = ("accuracy", "p_noise", "p_clean", "association_accuracy")
# The top component "holds" the noise association once it carries at least half of the mean noise margin.
HOLDS_NOISE = 0.5


@dataclass(frozen=True)
class MemoryConfig:
    """One training run of the associative memory and what it records."""

    d: int = 128  # d > N: room for every clean association (near-orthogonal inputs)
    n_tokens: int = 64
    alpha: float = 0.3  # PAPER.md 1a's default noise level
    shared: float = 0.0  # weight of a direction common to all inputs; 0 = near-orthogonal inputs
    lr: float = 1.0  # at lr 1 the defaults store 90% of the clean map by step ~80, yet P(noise) still climbs at 2000
    steps: int = 2000  # P(noise) passes half its final value at step ~500-650: both phases in view, ~10 s on CPU
    batch_size: int = 4  # small batches: samples seen grow slowly, so the two speeds separate
    full_batch: bool = False
    record_every: int = 10  # ~200 records: the SVDs then cost about as much as the training itself
    seed: int = 0
    device: str = "cpu"
    ks: tuple[int, ...] = (1, 2, 3, 4)  # the noise takes one component; 2-4 show what removing more costs
    top_components: int = 8  # beyond the first, components carried < 0.2% of the noise margin in every default run

    def __post_init__(self) -> None:
        checks.integer("d", self.d, 2, 4096)
        checks.integer("n_tokens", self.n_tokens, 2, 65536)
        # (0, 1): the noise needs some pairs and the clean map the rest.
        checks.real("alpha", self.alpha, 0.0, 1.0, low_open=True, high_open=True)
        checks.real("shared", self.shared, 0.0, 1.0, high_open=True)
        checks.real("lr", self.lr, 0.0, low_open=True)
        checks.integer("steps", self.steps, 1, 1_000_000)
        checks.integer("batch_size", self.batch_size, 1, 1_000_000)
        checks.integer("record_every", self.record_every, 1, self.steps)
        checks.seed("seed", self.seed)
        ks = tuple(checks.integer("k", k, 1, self.d - 1) for k in checks.non_empty("ks", self.ks))
        if list(ks) != sorted(set(ks)):
            raise ValueError(f"ks {ks!r} must be strictly increasing; allowed: distinct ks in increasing order")
        object.__setattr__(self, "ks", ks)
        checks.integer("top_components", self.top_components, 1, self.d)
        resolve_device(self.device)


@dataclass(frozen=True)
class Record:
    """What one measurement of W holds (see the module docstring)."""

    singular_values: list[float]  # all d, descending
    noise_share: list[float]  # of the top components
    noise_alignment: list[float]
    predictions: dict[str, Predictions[float]]  # variant -> clean-data metrics


@dataclass(frozen=True)
class MemorySummary:
    """The outcome in numbers (see :func:`summarize`); ``samples_*`` are None with full batch."""

    noise_component: int
    noise_share_final: float
    noise_alignment_final: float
    singular_gap_final: float
    step_noise_on_top_first: int | None
    step_noise_on_top: int | None
    step_association_half: int | None
    step_association_90: int | None
    step_p_noise_half: int | None
    step_p_clean_half: int | None
    samples_noise_on_top_first: int | None
    samples_noise_on_top: int | None
    samples_association_half: int | None
    samples_association_90: int | None
    samples_p_noise_half: int | None
    samples_p_clean_half: int | None
    final: dict[str, Predictions[float]]
    restoring_truncation: str | None


@dataclass
class MemoryResult(ResultMixin):
    """Everything recorded, lined up with ``steps`` (optimizer steps before each measurement).

    ``samples[i]``: training pairs drawn by then (SGD; None with full batch). ``singular_values[i]``:
    all d singular values of W, descending. ``noise_share[i][j]`` / ``noise_alignment[i][j]``: of
    component j + 1. ``metrics[variant]`` holds one list per metric, with variants ``full``,
    ``remove_top_<k>``, ``keep_top_<k>``. ``summary``: the outcome in numbers (see :func:`summarize`).
    """

    config: MemoryConfig
    steps: list[int]
    samples: list[int] | None
    losses: list[float]
    singular_values: list[list[float]]
    noise_share: list[list[float]]
    noise_alignment: list[list[float]]
    metrics: dict[str, Predictions[list[float]]]
    summary: MemorySummary
    seconds: float


def variants(ks: tuple[int, ...]) -> list[str]:
    return ["full"] + [f"remove_top_{k}" for k in ks] + [f"keep_top_{k}" for k in ks]


def noise_components(
    model: AssociativeMemory, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
) -> tuple[list[float], list[float]]:
    """Per component of ``W = u diag(s) vh``: its share of the mean noise margin, and its alignment."""
    c, mu = model.noise_direction()
    out_part, in_part = c @ u, vh @ mu  # (d,), (d,)
    parts = s * out_part * in_part
    total = float(parts.sum())
    share = (parts / total).tolist() if total != 0 else [math.nan] * len(parts)
    alignment = ((out_part.abs() * in_part.abs()) / (c.norm() * mu.norm())).tolist()
    return share, alignment


def _first_step(steps: list[int], ok: list[bool], *, stays: bool = False) -> int | None:
    """First step where ``ok`` holds (and, with ``stays``, holds at every later record)."""
    found = None
    for step, good in zip(steps, ok):
        if good and found is None:
            found = step
            if not stays:
                return found
        elif not good and stays:
            found = None
    return found


def _last(series: Predictions[list[float]]) -> Predictions[float]:
    return Predictions(
        accuracy=series.accuracy[-1],
        p_noise=series.p_noise[-1],
        p_clean=series.p_clean[-1],
        association_accuracy=series.association_accuracy[-1],
    )


def summarize(
    config: MemoryConfig,
    steps: list[int],
    singular_values: list[list[float]],
    noise_share: list[list[float]],
    noise_alignment: list[list[float]],
    metrics: dict[str, Predictions[list[float]]],
) -> MemorySummary:
    """The outcome: where the noise lives, how fast each part is learned, what truncation does.

    ``noise_component``: 1-based index of the component with the largest final noise share.
    ``step_noise_on_top_first``: first record at which the top component (largest singular value)
    holds >= HOLDS_NOISE of the noise margin; ``step_noise_on_top``: first record from which that
    holds at every later record. ``step_association_half`` / ``_90``: first record with
    association accuracy >= 0.5 / 0.9. ``step_p_noise_half`` / ``step_p_clean_half``: first record
    where P(noise) / P(f(x)) reaches half of its final value. With SGD each ``step_*`` has a
    ``samples_*`` twin (training pairs drawn by then; None with full batch). ``final``: last record
    of every variant. ``restoring_truncation``: the truncated variant with the lowest final
    P(noise) among those whose final clean accuracy is at least that of W (None if none is).
    """
    shares = noise_share
    last = shares[-1]
    finite = [(v if math.isfinite(v) else -math.inf) for v in last]
    top = max(range(len(finite)), key=lambda i: finite[i])
    on_top = [math.isfinite(row[0]) and row[0] >= HOLDS_NOISE for row in shares]
    full = metrics["full"]
    p_noise_final = full.p_noise[-1]
    final = {name: _last(series) for name, series in metrics.items()}
    full_acc = final["full"].accuracy
    candidates = [n for n in final if n != "full" and final[n].accuracy >= full_acc]
    restoring = min(candidates, key=lambda n: (final[n].p_noise, -final[n].p_clean)) if candidates else None
    s_last = singular_values[-1]
    step_noise_on_top_first = _first_step(steps, on_top)
    step_noise_on_top = _first_step(steps, on_top, stays=True)
    step_association_half = _first_step(steps, [a >= 0.5 for a in full.association_accuracy])
    step_association_90 = _first_step(steps, [a >= 0.9 for a in full.association_accuracy])
    step_p_noise_half = _first_step(steps, [p >= p_noise_final / 2 for p in full.p_noise])
    step_p_clean_half = _first_step(steps, [p >= full.p_clean[-1] / 2 for p in full.p_clean])

    def samples(step: int | None) -> int | None:
        return None if config.full_batch or step is None else step * config.batch_size

    return MemorySummary(
        noise_component=top + 1,
        noise_share_final=last[top],
        noise_alignment_final=noise_alignment[-1][top],
        singular_gap_final=s_last[0] / s_last[1] if s_last[1] > 0 else math.inf,
        step_noise_on_top_first=step_noise_on_top_first,
        step_noise_on_top=step_noise_on_top,
        step_association_half=step_association_half,
        step_association_90=step_association_90,
        step_p_noise_half=step_p_noise_half,
        step_p_clean_half=step_p_clean_half,
        samples_noise_on_top_first=samples(step_noise_on_top_first),
        samples_noise_on_top=samples(step_noise_on_top),
        samples_association_half=samples(step_association_half),
        samples_association_90=samples(step_association_90),
        samples_p_noise_half=samples(step_p_noise_half),
        samples_p_clean_half=samples(step_p_clean_half),
        final=final,
        restoring_truncation=restoring,
    )


def run(config: MemoryConfig, progress: Progress = None) -> MemoryResult:
    """Train the memory from W = 0 and record its singular structure and predictions over steps."""
    device = resolve_device(config.device)
    # One thread: every product is at most d x d (measured ~30x faster on a busy 2-core CPU).
    with cpu_threads(1, device):
        return _run(config, device, progress)


def _run(config: MemoryConfig, device: torch.device, progress: Progress) -> MemoryResult:
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    model = AssociativeMemory(config.d, config.n_tokens, generator, shared=float(config.shared)).to(device)
    targets = model.target_distribution(config.alpha)

    def loss_at(step: int) -> torch.Tensor:
        if config.full_batch:  # the exact expected loss: every input, its whole target law
            return F.cross_entropy(model.logits(), targets)
        x, y = model.sample(config.batch_size, config.alpha, generator)
        return F.cross_entropy(model(x), y)

    k_top = config.top_components

    def track(step: int) -> Record:
        w = model.memory.weight.detach()
        # All components, exact, sorted descending (one matrix in, one (U, S, Vh) out).
        u, s, vh = truncated_svd(w, config.d)
        share, align = noise_components(model, u, s, vh)
        weights = {"full": w}
        for k in config.ks:
            top = (u[:, :k] * s[:k]) @ vh[:k]
            weights[f"remove_top_{k}"] = w - top
            weights[f"keep_top_{k}"] = top
        return Record(
            singular_values=s.tolist(),
            noise_share=share[:k_top],
            noise_alignment=align[:k_top],
            predictions={name: prediction_metrics(model, weight) for name, weight in weights.items()},
        )

    optim = OptimConfig(name="sgd", lr=float(config.lr), momentum=0.0)  # plain SGD / GD, as in the model's analysis
    history = train(
        model,
        loss_at,
        steps=config.steps,
        optim=optim,
        progress=progress,
        stage="memory: training",
        track=track,
        track_every=config.record_every,
        progress_every=max(1, config.steps // 100),
    )
    steps = list(history.track_steps)
    records = history.tracked

    def series(name: str) -> Predictions[list[float]]:
        rows = [r.predictions[name] for r in records]
        return Predictions(
            accuracy=[p.accuracy for p in rows],
            p_noise=[p.p_noise for p in rows],
            p_clean=[p.p_clean for p in rows],
            association_accuracy=[p.association_accuracy for p in rows],
        )

    singular_values = [r.singular_values for r in records]
    noise_share = [r.noise_share for r in records]
    noise_alignment = [r.noise_alignment for r in records]
    metrics = {name: series(name) for name in variants(config.ks)}
    return MemoryResult(
        config=config,
        steps=steps,
        samples=None if config.full_batch else [t * config.batch_size for t in steps],
        losses=history.losses,
        singular_values=singular_values,
        noise_share=noise_share,
        noise_alignment=noise_alignment,
        metrics=metrics,
        summary=summarize(config, steps, singular_values, noise_share, noise_alignment, metrics),
        seconds=time.perf_counter() - start,
    )
