"""Next-token metrics of a causal LM on single-token-answer prompts, batched with padding.

Per prompt, at the last position: P(correct), P(" the"), P(subject) (IOI only),
logit(IO) - logit(S) (IOI only) and whether the correct token is the top-1 prediction.
Aggregates: mean probabilities, the *mean of per-prompt ratios* P(correct) / P(" the"), the
*ratio of the means* mean P(correct) / mean P(" the"), and accuracies.

Batches are right-padded and each prompt is read at its own last real position: with causal
attention, positions before the padding never see it, so a batch gives the numbers of one prompt
at a time (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fasttrunc import checks


@dataclass(frozen=True)
class Prompt:
    """A prompt whose correct continuation is the single token ``answer_id`` (text ``answer``)."""

    text: str
    answer: str
    answer_id: int
    subject: str | None = None  # IOI: the subject S, the distractor name
    subject_id: int | None = None
    kind: str = ""


# --- tokenization (Hugging Face tokenizers and raw `tokenizers.Tokenizer` alike) ----------------


def token_ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text``."""
    encoded = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(encoded.ids) if hasattr(encoded, "ids") else list(encoded)


def _unk_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "unk_token_id", None)


def single_token_ids(tokenizer: Any, words: Sequence[str]) -> dict[str, int]:
    """word -> id for the words that are exactly one known token with a leading space."""
    unk = _unk_id(tokenizer)
    out: dict[str, int] = {}
    for word in words:
        ids = token_ids(tokenizer, " " + word)
        if len(ids) == 1 and ids[0] != unk:
            out[word] = ids[0]
    return out


def known_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """The words whose tokens include no unknown token (every word passes a byte-level BPE)."""
    unk = _unk_id(tokenizer)
    return [w for w in words if unk is None or unk not in token_ids(tokenizer, " " + w)]


def the_token_id(tokenizer: Any) -> int:
    """The id of " the", the global association every task measures against."""
    ids = single_token_ids(tokenizer, ["the"])
    if "the" not in ids:
        raise ValueError('" the" is not a single known token under this tokenizer; the tasks need it')
    return ids["the"]


# --- encoding and scoring -----------------------------------------------------------------------


@dataclass
class EncodedPrompts:
    """Prompts as one right-padded id matrix plus what scoring needs."""

    input_ids: torch.Tensor  # (N, L) long, right-padded with 0
    attention_mask: torch.Tensor  # (N, L) long
    last_index: torch.Tensor  # (N,) position of each prompt's last real token
    answer_ids: torch.Tensor  # (N,)
    subject_ids: torch.Tensor  # (N,), -1 where a prompt has no subject
    the_id: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> EncodedPrompts:
    """Tokenize once (the tokenizer's own special tokens included) and right-pad."""
    if not prompts:
        raise ValueError("no prompts to encode; give at least one")
    rows = [token_ids(tokenizer, p.text, add_special_tokens=True) for p in prompts]
    empty = [p.text for p, r in zip(prompts, rows) if not r]
    if empty:
        raise ValueError(f"prompt {empty[0]!r} encodes to no tokens")
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return EncodedPrompts(
        input_ids=input_ids,
        attention_mask=mask,
        last_index=torch.tensor([len(r) - 1 for r in rows]),
        answer_ids=torch.tensor([p.answer_id for p in prompts]),
        subject_ids=torch.tensor([-1 if p.subject_id is None else p.subject_id for p in prompts]),
        the_id=the_token_id(tokenizer),
    )


def last_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """Logits (B, V) at each row's ``last_index``.

    A Hugging Face causal LM whose logits are its output embedding applied to the base model's
    last hidden state (GPT-NeoX, Llama, ...) gets the head applied at the read positions only,
    which skips B x L x V work the metrics never read; anything else runs its full forward.
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (
        base is not None
        and base is not model
        and isinstance(head, torch.nn.Linear)
        and type(model).__name__ in _HEAD_ONLY
    ):
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head(hidden[rows, last_index])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[rows, last_index]


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
        width = int(mask.sum(dim=1).max())  # drop columns that are padding in every row
        logits = last_logits(
            model,
            encoded.input_ids[start:stop, :width].to(device),
            mask[:, :width].to(device),
            encoded.last_index[start:stop].to(device),
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
