"""Noisy in-context recall data (PAPER.md 1a): a bigram Markov chain with a planted answer.

Each sequence draws an answer ``ybar``; tokens follow a fixed bigram chain (the first from its
unigram), except that the token right after every trigger ``q`` is ``ybar`` with probability
``1 - alpha`` and the noise token with probability ``alpha``. Two chains (:data:`DATA`):

- ``shakespeare`` (:func:`shakespeare_chain`): the paper's data. The 65 characters of tiny
  Shakespeare with their unigram and bigram counts (``fasttrunc/data/tiny_shakespeare.json``,
  computed from the text; the source is recorded in the file). As in the paper's reference code:
  the trigger is the most frequent character (the space), the noise token is an ordinary
  character (``'!'``, whose own bigram row the chain follows after it), and ``ybar`` is uniform
  over all 65 characters, the trigger and the noise token included.
- ``synthetic`` (:func:`make_chain`): the CPU-friendly stand-in. ``N`` ordinary tokens with a Zipf
  unigram and sparse, unigram-correlated bigram rows, token 0 (the most frequent) the trigger, an
  extra token ``N`` the noise token (after which the chain restarts from its unigram), and
  ``ybar`` uniform over the ordinary tokens other than the trigger.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch

from fasttrunc import checks

DATA = ("synthetic", "shakespeare")
TRIGGER = 0  # the synthetic chain's trigger
SHAKESPEARE_NOISE = "!"  # the paper's code: noise_token_id 2, the character '!'


@dataclass(frozen=True)
class MarkovChain:
    """Unigram ``(V,)`` and bigram ``(V, V)`` distributions over the whole vocabulary.

    ``trigger`` and ``noise`` are token ids; ``answers`` ``(K,)`` lists the tokens ``ybar`` is drawn
    from (uniformly); ``tokens`` names each id (characters for Shakespeare, empty for synthetic).
    """

    unigram: torch.Tensor
    bigram: torch.Tensor
    trigger: int
    noise: int
    answers: torch.Tensor
    name: str = "synthetic"
    tokens: str = ""

    @property
    def noise_token(self) -> int:
        return self.noise

    @property
    def vocab_size(self) -> int:
        return self.unigram.shape[0]

    def describe(self) -> str:
        if self.name == "shakespeare":
            return (
                f"tiny-Shakespeare character unigram/bigram statistics ({self.vocab_size} characters), "
                f"trigger {self.tokens[self.trigger]!r} (the most frequent), noise {self.tokens[self.noise]!r} "
                f"(an ordinary character), ybar uniform over all {int(self.answers.numel())} characters"
            )
        return (
            f"synthetic text-like bigram Markov chain over {self.vocab_size - 1} tokens (Zipf unigram, sparse rows; "
            f"the CPU-friendly stand-in for tiny Shakespeare), trigger = token {self.trigger} (the most frequent), "
            f"noise = extra token {self.noise}, ybar uniform over the {int(self.answers.numel())} other ordinary tokens"
        )


def make_chain(n_tokens: int, seed: int, zipf: float = 1.0, spread: float = 2.0) -> MarkovChain:
    """A fixed random text-like bigram chain over ``n_tokens`` ordinary tokens, plus the noise token ``n_tokens``.

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
    # Row N follows the noise token (restart from the unigram); column N: no row draws the noise.
    bigram = torch.cat(
        [torch.cat([rows, unigram[None, :]], dim=0), torch.zeros(n_tokens + 1, 1, dtype=torch.float64)], 1
    )
    return MarkovChain(
        unigram=torch.cat([unigram, torch.zeros(1, dtype=torch.float64)]).float(),
        bigram=bigram.float(),
        trigger=TRIGGER,
        noise=n_tokens,
        answers=torch.arange(1, n_tokens),
    )


@lru_cache(maxsize=1)
def shakespeare_counts() -> dict:
    """The shipped tiny-Shakespeare tables: ``chars``, ``unigram`` and ``bigram`` counts, ``source``."""
    text = resources.files("fasttrunc").joinpath("data/tiny_shakespeare.json").read_text(encoding="utf-8")
    return json.loads(text)


def shakespeare_chain() -> MarkovChain:
    """The paper's chain: tiny-Shakespeare character statistics, trigger the most frequent character."""
    counts = shakespeare_counts()
    chars = counts["chars"]
    unigram = torch.tensor(counts["unigram"], dtype=torch.float64)
    bigram = torch.tensor(counts["bigram"], dtype=torch.float64)
    bigram /= bigram.sum(dim=1, keepdim=True)
    return MarkovChain(
        unigram=(unigram / unigram.sum()).float(),
        bigram=bigram.float(),
        trigger=int(unigram.argmax()),
        noise=chars.index(SHAKESPEARE_NOISE),
        answers=torch.arange(len(chars)),
        name="shakespeare",
        tokens=chars,
    )


def chain_for(data: str, n_tokens: int, seed: int) -> MarkovChain:
    """The chain a run trains on: ``synthetic`` (``n_tokens`` and ``seed`` used) or ``shakespeare``."""
    checks.choice("data", data, DATA)
    return shakespeare_chain() if data == "shakespeare" else make_chain(n_tokens, seed=seed)


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
    cdf = cdf / cdf[..., -1:]  # a zero-probability tail then sits exactly at 1, out of reach
    cdf[..., -1] = 1.0
    return cdf


def sample_batch(chain: MarkovChain, batch: int, seq_len: int, alpha: float, generator: torch.Generator) -> RecallBatch:
    """``batch`` sequences of ``seq_len`` inputs (``seq_len + 1`` tokens drawn), on the CPU."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha!r} is outside [0, 1]")
    if batch < 1 or seq_len < 2:
        raise ValueError(f"batch {batch} must be >= 1 and seq_len {seq_len} >= 2")
    n = chain.vocab_size
    answers = chain.answers[torch.randint(0, int(chain.answers.numel()), (batch,), generator=generator)]
    # Inverse-CDF sampling with every uniform drawn up front: one searchsorted per position instead
    # of a multinomial call (about 10x faster at the paper's batch 512 x T 256).
    uniforms = torch.rand(seq_len + 1, batch, 1, generator=generator, dtype=torch.float64)
    noisy = torch.rand(seq_len + 1, batch, generator=generator) < alpha
    unigram_cdf, bigram_cdf = _cdf(chain.unigram), _cdf(chain.bigram)
    tokens = torch.empty(batch, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.searchsorted(unigram_cdf.expand(batch, n).contiguous(), uniforms[0], right=True).squeeze(1)
    noise = torch.full_like(answers, chain.noise)
    for t in range(1, seq_len + 1):
        prev = tokens[:, t - 1]
        nxt = torch.searchsorted(bigram_cdf[prev], uniforms[t], right=True).squeeze(1)
        planted = torch.where(noisy[t], noise, answers)
        tokens[:, t] = torch.where(prev == chain.trigger, planted, nxt)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    is_trigger = inputs == chain.trigger
    seen_before = (is_trigger.long().cumsum(dim=1) - is_trigger.long()) > 0
    return RecallBatch(inputs.contiguous(), targets.contiguous(), answers, is_trigger & seen_before)
