"""Teacher-forced scoring of answers of any length, choice tasks, and LASER's metrics.

Each scored text is the prompt followed by a continuation (:func:`fasttrunc.tasks.user.continuation`),
tokenized *jointly* (the tokenizer's special tokens included), so the answer's tokens are the ones
the model would really see after the prompt. They are located by character offsets when the
tokenizer gives them (every fast Hugging Face tokenizer), else as what follows the longest common
prefix with the prompt tokenized alone. A token straddling the boundary counts as an answer token.

The log-probability of an answer is the sum over its tokens of log P(token | prompt, the answer's
earlier tokens), read from one forward over the joint ids. Batches are padded on the right (or the
left, with position ids counted from each row's first real token); a batch gives the numbers of one
text at a time (tested).

Per example: the answer's summed log-probability and token count; ``correct`` is, for a choice
example, that the answer has the highest summed log-probability among the choices, and otherwise
that every answer token is the model's top-1 prediction at its position (greedy decoding would
produce the answer); ``rank`` (single-token answers only) is how many tokens score above it.
Aggregates (:class:`AnswerMetrics`): accuracy, top-5 / top-10 accuracy (single-token, non-choice
answers), mean log-probability, log-loss (mean over examples of -log P(answer) / answer tokens,
LASER's tie-break) and, over the examples with a distractor, the two ratio aggregates of
P(answer) / P(distractor) (``mean_of_ratios`` and ``ratio_of_means``, as in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.tasks.metrics import DEFAULT_BATCH_SIZE
from fasttrunc.tasks.tokens import token_ids
from fasttrunc.tasks.user import Example, continuation

PADDING_SIDES = ("right", "left")


# --- tokenization -------------------------------------------------------------------------------


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Ids (special tokens included) and character spans, or None when the tokenizer gives no offsets."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    return None


def answer_span(tokenizer: Any, prompt: str, text: str) -> tuple[list[int], int, int]:
    """``(ids, start, stop)``: ``prompt + text`` tokenized jointly; ``ids[start:stop]`` are ``text``'s tokens."""
    full = prompt + text
    boundary = len(prompt)
    found = _offsets(tokenizer, full)
    if found is not None:
        ids, spans = found
        inside = [i for i, (a, b) in enumerate(spans) if b > boundary and b > a]
        if inside and inside[0] > 0:
            return ids, inside[0], inside[-1] + 1
    else:
        ids = token_ids(tokenizer, full, add_special_tokens=True)
        alone = token_ids(tokenizer, prompt, add_special_tokens=True)
        special = set(getattr(tokenizer, "all_special_ids", ()))
        start = 0
        while start < min(len(ids), len(alone)) and ids[start] == alone[start]:
            start += 1
        stop = len(ids)
        while stop > start and ids[stop - 1] in special:
            stop -= 1
        if 0 < start < stop:
            return ids, start, stop
    raise ValueError(
        f"cannot locate the tokens of {text!r} after the prompt {prompt!r} (no prompt token or no answer token)"
    )


@dataclass
class EncodedAnswers:
    """Every text to score (answers, distractors, choices), tokenized once, and which example uses which.

    ``rows[q]`` are the joint ids of text ``q``, whose answer tokens are ``rows[q][starts[q]:stops[q]]``.
    """

    examples: tuple[Example, ...]
    rows: list[list[int]]
    starts: list[int]
    stops: list[int]
    answer_text: list[int]  # example -> text index of its answer
    distractor_text: list[int | None]
    choice_texts: list[tuple[int, ...] | None]
    pad_id: int

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, index: Sequence[int]) -> EncodedAnswers:
        """The examples at ``index``, in that order, with the texts they use (no tokenizing again)."""
        remap: dict[int, int] = {}

        def text(q: int) -> int:
            if q not in remap:
                remap[q] = len(remap)
            return remap[q]

        answer_text = [text(self.answer_text[i]) for i in index]
        distractor_text = [None if (d := self.distractor_text[i]) is None else text(d) for i in index]
        choice_texts = [None if (c := self.choice_texts[i]) is None else tuple(text(q) for q in c) for i in index]
        order = sorted(remap, key=remap.__getitem__)
        return EncodedAnswers(
            examples=tuple(self.examples[i] for i in index),
            rows=[self.rows[q] for q in order],
            starts=[self.starts[q] for q in order],
            stops=[self.stops[q] for q in order],
            answer_text=answer_text,
            distractor_text=distractor_text,
            choice_texts=choice_texts,
            pad_id=self.pad_id,
        )


def encode_answers(tokenizer: Any, examples: Sequence[Example]) -> EncodedAnswers:
    """Tokenize every example's answer, distractor and choices (each distinct prompt + text once)."""
    if not examples:
        raise ValueError("no examples to encode; give at least one")
    index: dict[tuple[str, str], int] = {}
    rows: list[list[int]] = []
    starts: list[int] = []
    stops: list[int] = []

    def text_id(example: Example, text: str) -> int:
        key = (example.prompt, continuation(example.prompt, text))
        if key not in index:
            try:
                ids, start, stop = answer_span(tokenizer, *key)
            except ValueError as exc:
                raise ValueError(f"line {example.line}: {exc}") from None
            index[key] = len(rows)
            rows.append(ids)
            starts.append(start)
            stops.append(stop)
        return index[key]

    answer_text, distractor_text, choice_texts = [], [], []
    for example in examples:
        answer_text.append(text_id(example, example.answer))
        distractor_text.append(None if example.distractor is None else text_id(example, example.distractor))
        choice_texts.append(None if example.choices is None else tuple(text_id(example, c) for c in example.choices))
    pad = getattr(tokenizer, "pad_token_id", None)
    return EncodedAnswers(
        examples=tuple(examples),
        rows=rows,
        starts=starts,
        stops=stops,
        answer_text=answer_text,
        distractor_text=distractor_text,
        choice_texts=choice_texts,
        pad_id=int(pad) if pad is not None else 0,
    )


# --- scoring ------------------------------------------------------------------------------------


@dataclass
class TextScores:
    """Per scored text: summed log-probability, every token top-1, and the first token's rank."""

    log_prob: torch.Tensor  # (Q,) float64
    greedy: torch.Tensor  # (Q,) bool
    first_rank: torch.Tensor  # (Q,) long: tokens scoring strictly above the first answer token


def _batch(
    rows: Sequence[list[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    shifts = []
    for i, row in enumerate(rows):
        shift = width - len(row) if side == "left" else 0
        ids[i, shift : shift + len(row)] = torch.tensor(row)
        mask[i, shift : shift + len(row)] = 1
        shifts.append(shift)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    return ids, mask, positions, shifts


@torch.no_grad()
def score_texts(
    model: torch.nn.Module, encoded: EncodedAnswers, batch_size: int = DEFAULT_BATCH_SIZE, padding_side: str = "right"
) -> TextScores:
    """One teacher-forced forward per batch of texts; the answer tokens' log-probabilities read off it."""
    checks.positive("batch_size", batch_size)
    checks.choice("padding_side", padding_side, PADDING_SIDES)
    device = next(model.parameters()).device
    n = len(encoded.rows)
    log_prob = torch.zeros(n, dtype=torch.float64)
    greedy = torch.zeros(n, dtype=torch.bool)
    first_rank = torch.zeros(n, dtype=torch.long)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        ids, mask, positions, shifts = _batch(encoded.rows[lo:hi], encoded.pad_id, padding_side)
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
        ).logits
        for i, q in enumerate(range(lo, hi)):
            start, stop = encoded.starts[q] + shifts[i], encoded.stops[q] + shifts[i]
            step = torch.log_softmax(logits[i, start - 1 : stop - 1].double(), dim=-1).cpu()
            target = ids[i, start:stop]
            picked = step.gather(1, target[:, None])[:, 0]
            log_prob[q] = picked.sum()
            greedy[q] = bool((step.argmax(dim=-1) == target).all())
            first_rank[q] = int((step[0] > picked[0]).sum())
    return TextScores(log_prob=log_prob, greedy=greedy, first_rank=first_rank)


@dataclass
class AnswerScores:
    """Per-example values (NaN / -1 where an example has no distractor, is multi-token or a choice)."""

    log_prob: torch.Tensor  # (N,) float64: summed log P(answer | prompt)
    n_tokens: torch.Tensor  # (N,) long
    correct: torch.Tensor  # (N,) bool
    rank: torch.Tensor  # (N,) long, -1 unless a single-token answer without choices
    distractor_log_prob: torch.Tensor  # (N,) float64, NaN without a distractor
    predicted: list[int | None]  # the chosen choice's index, None without choices
    choice_log_probs: list[list[float] | None]

    def __len__(self) -> int:
        return self.log_prob.shape[0]

    def subset(self, index: Sequence[int]) -> AnswerScores:
        """The examples at ``index`` (a list of positions), in that order."""
        at = torch.as_tensor(list(index), dtype=torch.long)
        return AnswerScores(
            log_prob=self.log_prob[at],
            n_tokens=self.n_tokens[at],
            correct=self.correct[at],
            rank=self.rank[at],
            distractor_log_prob=self.distractor_log_prob[at],
            predicted=[self.predicted[i] for i in index],
            choice_log_probs=[self.choice_log_probs[i] for i in index],
        )


def cat_answer_scores(parts: Sequence[AnswerScores]) -> AnswerScores:
    """Per-example scores of consecutive example chunks as one ``AnswerScores``."""

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    return AnswerScores(
        log_prob=cat("log_prob"),
        n_tokens=cat("n_tokens"),
        correct=cat("correct"),
        rank=cat("rank"),
        distractor_log_prob=cat("distractor_log_prob"),
        predicted=[v for p in parts for v in p.predicted],
        choice_log_probs=[v for p in parts for v in p.choice_log_probs],
    )


def score_answers(
    model: torch.nn.Module, encoded: EncodedAnswers, batch_size: int = DEFAULT_BATCH_SIZE, padding_side: str = "right"
) -> AnswerScores:
    """Score every example of ``encoded`` with ``model`` (see the module docstring for what each value is)."""
    texts = score_texts(model, encoded, batch_size, padding_side)
    n = len(encoded)
    a = torch.tensor(encoded.answer_text)
    n_tokens = torch.tensor([encoded.stops[q] - encoded.starts[q] for q in encoded.answer_text])
    correct = texts.greedy[a].clone()
    rank = torch.where(n_tokens == 1, texts.first_rank[a], torch.full((n,), -1))
    distractor = torch.full((n,), float("nan"), dtype=torch.float64)
    predicted: list[int | None] = []
    choice_lps: list[list[float] | None] = []
    for i, example in enumerate(encoded.examples):
        d = encoded.distractor_text[i]
        if d is not None:
            distractor[i] = texts.log_prob[d]
        choices = encoded.choice_texts[i]
        if choices is None or example.choices is None:
            predicted.append(None)
            choice_lps.append(None)
            continue
        lps = [float(texts.log_prob[q]) for q in choices]
        best = max(range(len(lps)), key=lambda j: lps[j])  # ties: the first listed choice
        predicted.append(best)
        choice_lps.append(lps)
        correct[i] = example.choices[best] == example.answer
        rank[i] = -1
    return AnswerScores(
        log_prob=texts.log_prob[a].clone(),
        n_tokens=n_tokens,
        correct=correct,
        rank=rank,
        distractor_log_prob=distractor,
        predicted=predicted,
        choice_log_probs=choice_lps,
    )


# --- aggregates and predictions -----------------------------------------------------------------


@dataclass
class AnswerMetrics:
    """Aggregates over examples; None where no example has what a metric needs."""

    n: int
    accuracy: float  # choice argmax, or every answer token top-1
    top5_accuracy: float | None  # single-token answers without choices only
    top10_accuracy: float | None
    mean_log_prob: float  # mean summed log P(answer)
    mean_p_answer: float  # mean P(answer) = exp(summed log-probability)
    log_loss: float  # mean of -log P(answer) / answer tokens: LASER's tie-break (lower is better)
    n_distractor: int
    mean_of_ratios: float | None  # mean over examples of P(answer) / P(distractor)
    ratio_of_means: float | None  # mean P(answer) / mean P(distractor)


def aggregate_answers(scores: AnswerScores) -> AnswerMetrics:
    if len(scores) == 0:
        raise ValueError("no examples to aggregate")
    single = scores.rank >= 0
    has_d = ~torch.isnan(scores.distractor_log_prob)

    def top(k: int) -> float | None:
        return float((scores.rank[single] < k).double().mean()) if bool(single.any()) else None

    mean_of_ratios = ratio_of_means = None
    if bool(has_d.any()):
        lp, ld = scores.log_prob[has_d], scores.distractor_log_prob[has_d]
        mean_of_ratios = float((lp - ld).exp().mean())
        p_d = float(ld.exp().mean())
        ratio_of_means = float(lp.exp().mean()) / p_d if p_d > 0 else math.inf
    return AnswerMetrics(
        n=len(scores),
        accuracy=float(scores.correct.double().mean()),
        top5_accuracy=top(5),
        top10_accuracy=top(10),
        mean_log_prob=float(scores.log_prob.mean()),
        mean_p_answer=float(scores.log_prob.exp().mean()),
        log_loss=float((-scores.log_prob / scores.n_tokens.double()).mean()),
        n_distractor=int(has_d.sum()),
        mean_of_ratios=mean_of_ratios,
        ratio_of_means=ratio_of_means,
    )


@dataclass(frozen=True)
class AnswerPrediction:
    """One example's values, JSON-ready through :func:`fasttrunc.runs.jsonable` (``--save-predictions``)."""

    line: int
    prompt: str
    answer: str
    n_tokens: int
    log_prob: float
    log_loss: float
    correct: bool
    rank: int | None
    distractor_log_prob: float | None
    predicted_choice: str | None
    choice_log_probs: list[float] | None


def predictions(
    encoded: EncodedAnswers, scores: AnswerScores, index: Sequence[int] | None = None
) -> list[AnswerPrediction]:
    """Per-example predictions for the examples at ``index`` (default: all), in that order.

    ``scores`` holds all of ``encoded``'s examples (not a subset).
    """
    out = []
    for i in range(len(encoded)) if index is None else index:
        example = encoded.examples[i]
        d = float(scores.distractor_log_prob[i])
        choice = scores.predicted[i]
        n_tok = int(scores.n_tokens[i])
        out.append(
            AnswerPrediction(
                line=example.line,
                prompt=example.prompt,
                answer=example.answer,
                n_tokens=n_tok,
                log_prob=float(scores.log_prob[i]),
                log_loss=-float(scores.log_prob[i]) / n_tok,
                correct=bool(scores.correct[i]),
                rank=int(scores.rank[i]) if int(scores.rank[i]) >= 0 else None,
                distractor_log_prob=None if math.isnan(d) else d,
                predicted_choice=None if choice is None or example.choices is None else example.choices[choice],
                choice_log_probs=scores.choice_log_probs[i],
            )
        )
    return out


__all__ = [
    "AnswerMetrics",
    "AnswerPrediction",
    "AnswerScores",
    "EncodedAnswers",
    "aggregate_answers",
    "answer_span",
    "encode_answers",
    "predictions",
    "score_answers",
    "score_texts",
]
