"""A linear associative memory trained on a noisy map (PAPER.md 1b; Bietti et al. 2023).

``N`` input tokens with random unit-norm embeddings ``e_x`` (rows of ``inputs``, near-orthogonal:
``|e_x . e_x'| ~ 1/sqrt(d)``) and ``N + 1`` output tokens with embeddings ``u_j`` (rows of
``outputs``; the last one, index ``N``, is the noise token). The memory is one ``d x d`` matrix
``W`` (``memory.weight``, an ``nn.Linear`` without bias, zero at initialisation) and the logits
of input ``x`` are ``u_j . W e_x``.

With ``shared = s > 0`` every input embedding also carries a common unit direction ``m``:
``e_x ~ sqrt(s) m + sqrt(1 - s) z_x`` (renormalised), so ``e_x . e_x' ~ s``: the inputs then share
a feature, as the trigger does at every trigger position of the recall model.

Data: ``x`` uniform over the ``N`` inputs; the target is the clean output ``f(x)`` (a fixed random
permutation) with probability ``1 - alpha`` and the noise token with probability ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import nn

V = TypeVar("V")


@dataclass(frozen=True)
class Predictions(Generic[V]):
    """The clean-data metrics of :func:`prediction_metrics`: floats for one W, lists along training."""

    accuracy: V
    p_noise: V
    p_clean: V
    association_accuracy: V


def _unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    rows = torch.randn(n, d, generator=generator)
    return rows / rows.norm(dim=1, keepdim=True)


class AssociativeMemory(nn.Module):
    """``forward(x (B,)) -> logits (B, N + 1)``; ``logits(weight=...)`` scores any ``d x d`` matrix."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    clean_map: torch.Tensor

    def __init__(self, d: int, n_tokens: int, generator: torch.Generator, shared: float = 0.0) -> None:
        super().__init__()
        self.d, self.n_tokens = d, n_tokens
        self.noise_token = n_tokens
        # Frozen embeddings (buffers): only the memory W learns.
        inputs = _unit_rows(n_tokens, d, generator)
        self.register_buffer("outputs", _unit_rows(n_tokens + 1, d, generator))
        self.register_buffer("clean_map", torch.randperm(n_tokens, generator=generator))
        if shared > 0:  # a direction common to every input, like the trigger in the recall model's FF2 input
            common = _unit_rows(1, d, generator)
            inputs = shared**0.5 * common + (1 - shared) ** 0.5 * inputs
            inputs = inputs / inputs.norm(dim=1, keepdim=True)
        self.register_buffer("inputs", inputs)
        self.memory = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.memory.weight)

    def logits(self, x: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, N + 1)`` of inputs ``x`` (all ``N`` inputs when None) under ``weight`` (W by default)."""
        w = self.memory.weight if weight is None else weight
        e = self.inputs if x is None else self.inputs[x]
        return (e @ w.T) @ self.outputs.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def sample(self, batch: int, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` training pairs ``(x, y)``: ``y = f(x)``, or the noise token with probability ``alpha``."""
        x = torch.randint(self.n_tokens, (batch,), generator=generator)
        noisy = torch.rand(batch, generator=generator) < alpha
        y = torch.where(noisy, torch.full_like(x, self.noise_token), self.clean_map.cpu()[x])
        return x.to(self.inputs.device), y.to(self.inputs.device)

    def target_distribution(self, alpha: float) -> torch.Tensor:
        """``(N, N + 1)``: row ``x`` is the law of the target given ``x`` (for full-batch training)."""
        n = self.n_tokens
        q = torch.zeros(n, n + 1, device=self.inputs.device)
        q[torch.arange(n, device=q.device), self.clean_map] = 1 - alpha
        q[:, self.noise_token] = alpha
        return q

    def noise_direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_noise - mean clean u, mean input e)``: the pair whose outer product is the noise association.

        ``(u_noise - mean_j u_j) . W e_x`` is the noise token's logit minus the average clean
        logit at ``x``; averaged over inputs it is ``(u_noise - mean_j u_j) . W mu``.
        """
        centred = self.outputs[self.noise_token] - self.outputs[: self.n_tokens].mean(dim=0)
        return centred, self.inputs.mean(dim=0)


@torch.no_grad()
def prediction_metrics(model: AssociativeMemory, weight: torch.Tensor | None = None) -> Predictions[float]:
    """Clean-data metrics of ``weight`` (W by default) over all inputs, each weighted ``1/N``.

    ``accuracy``: argmax is ``f(x)``; ``p_noise`` / ``p_clean``: mean probability of the noise
    token / of ``f(x)``; ``association_accuracy``: argmax over the clean outputs only is ``f(x)``
    (whether the clean association is stored, whatever the noise token does).
    """
    z = model.logits(weight=weight)
    p = z.softmax(dim=-1)
    rows = torch.arange(model.n_tokens, device=z.device)
    f = model.clean_map
    return Predictions(
        accuracy=float(z.argmax(dim=-1).eq(f).float().mean()),
        p_noise=float(p[:, model.noise_token].mean()),
        p_clean=float(p[rows, f].mean()),
        association_accuracy=float(z[:, : model.n_tokens].argmax(dim=-1).eq(f).float().mean()),
    )
