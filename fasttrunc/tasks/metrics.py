"""Next-token metrics of a causal LM on single-token-answer prompts, batched with padding.

Per prompt, at the last position: P(correct), P(" the"), P(subject) (IOI only),
logit(IO) - logit(S) (IOI only) and whether the correct token is the top-1 prediction.
Aggregates: mean probabilities, the *mean of per-prompt ratios* P(correct) / P(" the"), the
*ratio of the means* mean P(correct) / mean P(" the"), and accuracies.

Batches are padded on the tokenizer's side (:mod:`fasttrunc.tasks.tokens`) and each prompt is
read at its own last real position. Right padding: with causal attention, real positions never
see the padding after them. Left padding: the padding is masked out and the real tokens get the
positions 0, 1, ... they have alone. Either way a batch gives the numbers of one prompt at a time
(tested).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.tasks import tokens
from fasttrunc.tasks.tokens import the_token_id


@dataclass(frozen=True)
class Prompt:
    """A prompt whose correct continuation is the single token ``answer_id`` (text ``answer``)."""

    text: str
    answer: str
    answer_id: int
    subject: str | None = None  # IOI: the subject S, the distractor name
    subject_id: int | None = None
    kind: str = ""


# --- encoding and scoring -----------------------------------------------------------------------


@dataclass
class EncodedPrompts:
    """Prompts as one padded id matrix plus what scoring needs."""

    input_ids: torch.Tensor  # (N, L) long, padded on either side
    attention_mask: torch.Tensor  # (N, L) long, 0 at padded positions
    last_index: torch.Tensor  # (N,) position of each prompt's last real token
    answer_ids: torch.Tensor  # (N,)
    subject_ids: torch.Tensor  # (N,), -1 where a prompt has no subject
    the_id: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int | None) -> EncodedPrompts:
        """Prompts ``start:stop``."""
        part = slice(start, stop)
        tensors = {f.name: getattr(self, f.name)[part] for f in fields(self) if f.name != "the_id"}
        return EncodedPrompts(**tensors, the_id=self.the_id)


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], padding_side: str | None = None) -> EncodedPrompts:
    """Tokenize once (after the tokenizer's own leading special tokens) and pad.

    Padding goes on ``padding_side`` (``"left"`` or ``"right"``; by default the tokenizer's
    ``padding_side``) with :func:`fasttrunc.tasks.tokens.pad_id`; the tokenizer is not changed.
    """
    if not prompts:
        raise ValueError("no prompts to encode; give at least one")
    side = tokens.padding_side(tokenizer, padding_side)
    prefix = tokens.special_prefix(tokenizer)
    rows = [tokens.prompt_ids(tokenizer, p.text, prefix) for p in prompts]
    empty = [p.text for p, r in zip(prompts, rows) if not r]
    if empty:
        raise ValueError(f"prompt {empty[0]!r} encodes to no tokens")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokens.pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    last = [len(r) - 1 if side == "right" else width - 1 for r in rows]
    return EncodedPrompts(
        input_ids=input_ids,
        attention_mask=mask,
        last_index=torch.tensor(last),
        answer_ids=torch.tensor([p.answer_id for p in prompts]),
        subject_ids=torch.tensor([-1 if p.subject_id is None else p.subject_id for p in prompts]),
        the_id=the_token_id(tokenizer),
    )


def _trim(mask: torch.Tensor, last_index: torch.Tensor) -> tuple[slice, torch.Tensor]:
    """The columns that are real in some row, and ``last_index`` within them."""
    real = torch.nonzero(mask.any(dim=0)).flatten()
    lo, hi = int(real[0]), int(real[-1]) + 1
    return slice(lo, hi), last_index - lo


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position among its row's real tokens (0, 1, ...); 0 at padded positions."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def last_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """Logits (B, V) at each row's ``last_index``.

    A Hugging Face causal LM whose logits are its output embedding applied to the base model's
    last hidden state (GPT-NeoX, Llama, ...) gets the head applied at the read positions only,
    which skips B x L x V work the metrics never read; anything else runs its full forward.
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    base: Any = getattr(model, "base_model", None)
    head: Any = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_only = (
        base is not None
        and base is not model
        and isinstance(head, torch.nn.Linear)
        and type(model).__name__ in _HEAD_ONLY
    )
    runs = base if head_only else model
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not bool(attention_mask[:, 0].all()) and _takes_positions(runs):
        # Left padding: the real tokens get the positions they have alone. A model that takes no
        # position ids (BLOOM's ALiBi) derives them from the mask itself.
        inputs["position_ids"] = position_ids(attention_mask)
    if head_only:
        hidden = runs(**inputs).last_hidden_state
        return head(hidden[rows, last_index])
    logits = model(**inputs).logits
    return logits[rows, last_index]


def _takes_positions(model: Any) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no inspectable signature
        return False


# Causal LMs whose forward is exactly ``lm_head(base_model(...).last_hidden_state)`` (no logit
# scaling or soft-capping), checked against the full forward in the tests.
_HEAD_ONLY = frozenset({"GPTNeoXForCausalLM"})


@dataclass
class Scores:
    """Per-prompt values; NaN where a prompt has no subject."""

    p_correct: torch.Tensor
    p_the: torch.Tensor
    p_subject: torch.Tensor
    logit_diff: torch.Tensor  # logit(correct) - logit(subject)
    top1: torch.Tensor  # bool: the correct token is the argmax

    def __len__(self) -> int:
        return self.p_correct.shape[0]

    def subset(self, index: slice | torch.Tensor) -> Scores:
        return Scores(*(getattr(self, f)[index] for f in ("p_correct", "p_the", "p_subject", "logit_diff", "top1")))

    def per_prompt(self) -> list[PromptMetrics]:
        def num(x: torch.Tensor) -> float | None:
            v = float(x)
            return None if math.isnan(v) else v

        return [
            PromptMetrics(
                p_correct=float(self.p_correct[i]),
                p_the=float(self.p_the[i]),
                p_subject=num(self.p_subject[i]),
                logit_diff=num(self.logit_diff[i]),
                top1_correct=bool(self.top1[i]),
            )
            for i in range(len(self))
        ]


@dataclass(frozen=True)
class PromptMetrics:
    """One prompt's values; ``p_subject`` and ``logit_diff`` are None where it has no subject."""

    p_correct: float
    p_the: float
    p_subject: float | None
    logit_diff: float | None
    top1_correct: bool


# Prompts per forward by default: 32 prompts of ~20 tokens keep a Pythia-1.4b forward well inside
# any GPU's memory while amortizing launch overhead; CPU runs are memory-light at this size too.
DEFAULT_BATCH_SIZE = 32


@torch.no_grad()
def score(model: torch.nn.Module, encoded: EncodedPrompts, batch_size: int = DEFAULT_BATCH_SIZE) -> Scores:
    """Run ``model`` over the prompts in batches of ``batch_size`` and read the last positions."""
    checks.positive("batch_size", batch_size)
    device = next(model.parameters()).device
    parts: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        stop = min(start + batch_size, len(encoded))
        mask = encoded.attention_mask[start:stop]
        cols, last = _trim(mask, encoded.last_index[start:stop])  # drop columns padded in every row
        logits = last_logits(
            model, encoded.input_ids[start:stop, cols].to(device), mask[:, cols].to(device), last.to(device)
        )
        parts.append(logits.float().cpu())
    logits = torch.cat(parts)
    logp = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(encoded))
    has_subject = encoded.subject_ids >= 0
    subject = encoded.subject_ids.clamp_min(0)  # index 0 is a placeholder, masked to NaN below
    nan = torch.full((len(encoded),), float("nan"))
    return Scores(
        p_correct=logp[rows, encoded.answer_ids].exp(),
        p_the=logp[:, encoded.the_id].exp(),
        p_subject=torch.where(has_subject, logp[rows, subject].exp(), nan),
        logit_diff=torch.where(has_subject, logits[rows, encoded.answer_ids] - logits[rows, subject], nan),
        top1=logits.argmax(dim=-1) == encoded.answer_ids,
    )


@dataclass
class TaskMetrics:
    """Aggregates over prompts. ``mean_of_ratios`` = mean over prompts of P(correct)/P(" the");
    ``ratio_of_means`` = mean P(correct) / mean P(" the")."""

    n: int
    mean_p_correct: float
    mean_p_the: float
    mean_p_subject: float | None
    mean_of_ratios: float
    ratio_of_means: float
    accuracy: float  # the correct token is the top-1 prediction
    logit_diff_accuracy: float | None  # logit(IO) > logit(S), Wang et al.'s IOI accuracy
    mean_logit_diff: float | None


def aggregate(scores: Scores) -> TaskMetrics:
    if len(scores) == 0:
        raise ValueError("no prompts to aggregate")
    has_subject = ~torch.isnan(scores.p_subject)

    def mean(x: torch.Tensor) -> float:
        return float(x.double().mean())

    def subject_mean(x: torch.Tensor) -> float | None:
        return mean(x[has_subject]) if bool(has_subject.any()) else None

    mean_the = mean(scores.p_the)
    return TaskMetrics(
        n=len(scores),
        mean_p_correct=mean(scores.p_correct),
        mean_p_the=mean_the,
        mean_p_subject=subject_mean(scores.p_subject),
        mean_of_ratios=mean(scores.p_correct.double() / scores.p_the.double()),
        ratio_of_means=mean(scores.p_correct) / mean_the if mean_the > 0 else float("inf"),
        accuracy=mean(scores.top1),
        logit_diff_accuracy=subject_mean(scores.logit_diff > 0),
        mean_logit_diff=subject_mean(scores.logit_diff),
    )
