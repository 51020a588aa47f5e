"""Noisy in-context recall data (PAPER.md 1a), on a synthetic text-like Markov chain.

Tokens ``0 .. N-1`` are ordinary; token ``N`` is the noise token, so the vocabulary has ``N + 1``
entries. Token ``0`` is the trigger ``q`` (the most frequent token of the chain, like the space in
tiny Shakespeare). Each sequence draws its answer ``ybar`` uniformly from the ordinary tokens other
than the trigger; tokens then follow a fixed bigram chain, except that the token right after every
``q`` is ``ybar`` with probability ``1 - alpha`` and the noise token with probability ``alpha``.
After a noise token the chain restarts from its unigram distribution.

The chain stands in for the tiny-Shakespeare character statistics of the reference code (which
this project does not ship): a Zipf unigram and sparse, unigram-correlated bigram rows, so that
the trigger is frequent and the bigram structure is something a model can learn globally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fasttrunc import checks

TRIGGER = 0


@dataclass(frozen=True)
class MarkovChain:
    """Unigram ``(N,)`` and bigram ``(N + 1, N)`` distributions; row ``N`` follows the noise token."""

    unigram: torch.Tensor
    bigram: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.unigram.shape[0]

    @property
    def noise_token(self) -> int:
        return self.n_tokens

    @property
    def vocab_size(self) -> int:
        return self.n_tokens + 1


def make_chain(n_tokens: int, seed: int, zipf: float = 1.0, spread: float = 2.0) -> MarkovChain:
    """A fixed random text-like bigram chain over ``n_tokens`` ordinary tokens.

    ``zipf``: exponent of the unigram ``p_i ~ 1/(i+1)^zipf`` (1.0 is the classic word/character
    law; with the chain's rows it puts the trigger at about 1 in 7 positions for N = 32, so a
    64-token sequence has about 8 trigger positions to learn from).
    ``spread``: standard deviation of the log-normal per-entry weights of each bigram row; 2.0
    makes each row put most of its mass on a handful of successors, as character bigrams do.
    """
    checks.integer("n_tokens", n_tokens, 3)  # a trigger and two answers at least
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, n_tokens + 1, dtype=torch.float64)
    unigram = ranks.pow(-zipf)
    unigram /= unigram.sum()
    weights = torch.exp(spread * torch.randn(n_tokens, n_tokens, generator=g, dtype=torch.float64))
    rows = unigram[None, :] * weights
    rows /= rows.sum(dim=1, keepdim=True)
    bigram = torch.cat([rows, unigram[None, :]], dim=0)
    return MarkovChain(unigram=unigram.float(), bigram=bigram.float())


@dataclass
class RecallBatch:
    """``inputs`` and ``targets`` ``(B, T)`` (targets are inputs shifted by one), ``answers`` ``(B,)``
    (each sequence's ybar), ``mask`` ``(B, T)``: input positions holding the trigger with an
    earlier trigger in the sequence, where the loss and the metrics are taken."""

    inputs: torch.Tensor
    targets: torch.Tensor
    answers: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> RecallBatch:
        return RecallBatch(*(t.to(device) for t in (self.inputs, self.targets, self.answers, self.mask)))


def _cdf(probs: torch.Tensor) -> torch.Tensor:
    """Row-wise cumulative sums in fp64 with the last entry exactly 1, so a uniform in [0, 1)
    always lands on a token and a zero-probability token is never drawn (``right=True``)."""
    cdf = probs.double().cumsum(dim=-1)
    cdf[..., -1] = 1.0
    return cdf


def sample_batch(chain: MarkovChain, batch: int, seq_len: int, alpha: float, generator: torch.Generator) -> RecallBatch:
    """``batch`` sequences of ``seq_len`` inputs (``seq_len + 1`` tokens drawn), on the CPU."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha!r} is outside [0, 1]")
    if batch < 1 or seq_len < 2:
        raise ValueError(f"batch {batch} must be >= 1 and seq_len {seq_len} >= 2")
    n = chain.n_tokens
    answers = torch.randint(1, n, (batch,), generator=generator)
    # Inverse-CDF sampling with every uniform drawn up front: one searchsorted per position instead
    # of a multinomial call (about 10x faster at the paper's batch 512 x T 256).
    uniforms = torch.rand(seq_len + 1, batch, 1, generator=generator, dtype=torch.float64)
    noisy = torch.rand(seq_len + 1, batch, generator=generator) < alpha
    unigram_cdf, bigram_cdf = _cdf(chain.unigram), _cdf(chain.bigram)
    tokens = torch.empty(batch, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.searchsorted(unigram_cdf.expand(batch, n).contiguous(), uniforms[0], right=True).squeeze(1)
    noise = torch.full_like(answers, chain.noise_token)
    for t in range(1, seq_len + 1):
        prev = tokens[:, t - 1]
        nxt = torch.searchsorted(bigram_cdf[prev], uniforms[t], right=True).squeeze(1)
        planted = torch.where(noisy[t], noise, answers)
        tokens[:, t] = torch.where(prev == TRIGGER, planted, nxt)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    is_trigger = inputs == TRIGGER
    seen_before = (is_trigger.long().cumsum(dim=1) - is_trigger.long()) > 0
    return RecallBatch(inputs.contiguous(), targets.contiguous(), answers, is_trigger & seen_before)
