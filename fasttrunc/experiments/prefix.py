"""Prefix reuse for a sweep: the blocks before the edited layer run once per prompt batch.

An edit of layer ``L`` leaves blocks ``0..L-1`` untouched, so their output is the same for every
cell of that layer. :class:`PrefixCache` runs the unedited model once per batch with forward
hooks that keep what each needed block returned (exactly that object: a tensor or a tuple), on
the model's device. For the cells of layer ``L``, :meth:`PrefixCache.skipping` swaps blocks
``0..L-1`` for :class:`CachedBlock` stubs (through ``replace_modules_``, so a restorable
``Truncation``): each ignores its input and returns block ``L-1``'s cached output for the
current batch, so only the embedding, block ``L`` onward and the head run. Nothing here is
family-specific: the family row's block list is all it needs (and its MLP module, to run the last block's MLP at
the last position only).

:class:`LastPositionLM` wraps a causal LM so that its head runs at each prompt's last real
position only (a forward pre-hook on the output embeddings gathers those rows), the only
position the metrics read; anything the model applies after the head (soft-capping, scaling)
still runs, on those rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fasttrunc.families import detect_family
from fasttrunc.tasks.answers import (
    AnswerMetrics,
    AnswerScores,
    EncodedAnswers,
    aggregate_answers,
    cat_answer_scores,
    score_answers,
)
from fasttrunc.tasks.metrics import EncodedPrompts, Scores, TaskMetrics, aggregate, score
from fasttrunc.truncation import replace_modules_


def nbytes(value: object) -> int:
    """Bytes of the tensors held in ``value`` (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    return 0


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple) and value:
        return _first_tensor(value[0])
    return None


class _Replay:
    """The cached outputs of one block, replayed in the order they were captured."""

    def __init__(self, outputs: Sequence[object]):
        self.outputs = list(outputs)
        self.cursor = -1
        self.current: object = None

    def advance(self, hidden: object) -> object:
        self.cursor += 1
        if self.cursor >= len(self.outputs):
            raise RuntimeError("the cached prefix ran out of batches: rewind it before each evaluation")
        self.current = self.outputs[self.cursor]
        got, want = _first_tensor(hidden), _first_tensor(self.current)
        if got is not None and want is not None and got.shape[:2] != want.shape[:2]:
            raise RuntimeError(
                f"the cached prefix holds a batch of shape {tuple(want.shape[:2])}, not {tuple(got.shape[:2])}: "
                "the prompts must be evaluated in the order they were captured"
            )
        return self.current


class CachedBlock(nn.Module):
    """A stand-in for a block before the edited one: returns the cached output of the last of them.

    The first stub of the prefix advances the replay (one batch per forward); the others return
    the same object, which the model's block loop hands on as it would a real block's output.
    """

    def __init__(self, replay: _Replay, first: bool):
        super().__init__()
        self.replay = replay
        self.first = first

    def forward(self, *args: Any, **kwargs: Any) -> object:
        if self.first:
            hidden = args[0] if args else kwargs.get("hidden_states")
            return self.replay.advance(hidden)
        return self.replay.current


class LastPositionLM(nn.Module):
    """``model`` with its head applied at each row's last real position only (right padding).

    Returns an object whose ``logits`` is ``(B, L, V)`` as ``metrics.score`` reads it, every
    position holding the last position's logits (an expanded view: no copy), so
    ``metrics.score`` batches, trims and scores exactly as it does for the model itself.

    With ``last_mlp`` (the MLP module of the last block) that MLP runs at the last position only
    too: a pre-hook gathers the rows of each ``(B, L, ...)`` input it gets, a forward hook
    broadcasts its ``(B, 1, ...)`` output back to ``(B, L, ...)``. Nothing after the last block
    mixes positions (the final norm is per position, the head reads the last one), so the
    position the metrics read is exact and the others, which nobody reads, are not.
    """

    def __init__(self, model: nn.Module, last_mlp: nn.Module | None = None):
        super().__init__()
        self.model = model
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if not isinstance(head, nn.Module):
            raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings) to score with")
        self.head = head
        self.last_mlp = last_mlp
        self._rows: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self._width = 0
        self._cut = False

    def _is_full(self, value: object) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and self._rows is not None
            and value.dim() == 3
            and value.shape[0] == self._rows.shape[0]
            and value.shape[1] == self._width
        )

    def _mlp_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._last is None or self._width < 2:
            return None

        def cut(value: Any) -> Any:
            if self._is_full(value):
                self._cut = True
                return value[self._rows, self._last].unsqueeze(1)
            return value

        self._cut = False
        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    def _mlp_output(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not self._cut:
            return None
        self._cut = False

        def widen(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[1] == 1:
                return value.expand(-1, self._width, -1).contiguous()
            return value

        return tuple(widen(v) for v in output) if isinstance(output, tuple) else widen(output)

    def _gather(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._last is None or not args:
            return None
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[1] == 1:
            return None
        return (hidden[self._rows, self._last].unsqueeze(1), *args[1:])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self._rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        self._last = attention_mask.sum(dim=1) - 1
        self._width = input_ids.shape[1]
        handles = [self.head.register_forward_pre_hook(self._gather)]
        if self.last_mlp is not None:
            handles.append(self.last_mlp.register_forward_pre_hook(self._mlp_inputs, with_kwargs=True))
            handles.append(self.last_mlp.register_forward_hook(self._mlp_output, with_kwargs=True))
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            self._last = None
            self._cut = False
        logits = out.logits
        return SimpleNamespace(logits=logits[:, -1:].expand(-1, input_ids.shape[1], -1))


@dataclass
class AnswerSet:
    """Examples of a task file as one of a sweep's prompt sets: scored teacher-forced, every answer
    token read (:func:`fasttrunc.tasks.answers.score_answers`), so the head runs at every position."""

    encoded: EncodedAnswers

    def __len__(self) -> int:
        return len(self.encoded)

    def rows(self, start: int, stop: int | None) -> AnswerSet:
        return AnswerSet(self.encoded.subset(range(len(self))[start:stop]))

    def batch_tokens(self, batch_size: int) -> list[int]:
        """Tokens (rows x padded width) of each forward batch."""
        rows = self.encoded.rows
        return [
            max(map(len, rows[i : i + batch_size])) * len(rows[i : i + batch_size])
            for i in range(0, len(rows), batch_size)
        ]


PromptSet = EncodedPrompts | AnswerSet
AnyScores = Scores | AnswerScores


def batch_tokens(enc: PromptSet, batch_size: int) -> list[int]:
    """Tokens (rows x padded width) of each forward batch that scoring ``enc`` runs."""
    if isinstance(enc, AnswerSet):
        return enc.batch_tokens(batch_size)
    out = []
    for start in range(0, len(enc), batch_size):
        mask = enc.attention_mask[start : start + batch_size]
        out.append(int(mask.sum(dim=1).max()) * mask.shape[0])
    return out


def cat_scores(parts: Sequence[AnyScores]) -> AnyScores:
    """Per-prompt scores of consecutive prompt chunks as one ``Scores`` (or ``AnswerScores``)."""
    if isinstance(parts[0], AnswerScores):
        return cat_answer_scores(parts)  # type: ignore[arg-type]
    fields = ("p_correct", "p_the", "p_subject", "logit_diff", "top1")
    return Scores(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


def aggregate_scores(scores: AnyScores) -> TaskMetrics | AnswerMetrics:
    """The task's aggregates: the paper's metrics for built-in tasks, LASER's for task files."""
    return aggregate_answers(scores) if isinstance(scores, AnswerScores) else aggregate(scores)


class PrefixCache:
    """The outputs of the blocks before some swept layers, for a list of prompt sets.

    ``capture(prompt_sets, layers)`` runs the unedited model over every prompt set (in batches of
    ``batch_size``), keeps what blocks ``layer - 1`` return, and returns the scores: the baseline
    comes for free. ``score(layer, prompt_sets, which)`` then runs only block ``layer`` onward on
    the sets numbered ``which`` (default: all), with whatever edit the model holds.
    """

    def __init__(self, model: nn.Module, blocks_path: str, batch_size: int, last_mlp: str | None = None):
        self.model = model
        self.blocks_path = blocks_path
        blocks = model.get_submodule(blocks_path)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{blocks_path} is not a block list (nn.ModuleList)")
        # The last block's MLP at the last position only, where the family row names the MLP.
        mlp = None if last_mlp is None else blocks[len(blocks) - 1].get_submodule(last_mlp)
        self.lm = LastPositionLM(model, mlp)
        self.n_blocks = len(blocks)
        self.batch_size = batch_size
        self.outputs: dict[int, list[list[object]]] = {}  # block -> per prompt set, its output per batch
        self.bytes = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int) -> PrefixCache:
        """The cache of ``model``'s family row: its block list, and its MLP module when it names one."""
        family, blocks_path, _ = detect_family(model)
        return cls(model, blocks_path, batch_size, family.mlp_module())

    def batch_bytes(self, prompt_sets: Sequence[PromptSet], layer: int) -> list[list[int]]:
        """Bytes one layer's cache takes per batch of each prompt set (measured on one batch, scaled by tokens)."""
        if layer == 0:
            return [[0] * len(batch_tokens(enc, self.batch_size)) for enc in prompt_sets]
        probe = prompt_sets[0].rows(0, self.batch_size)
        self.capture([probe], [layer])
        per_token = self.bytes / sum(batch_tokens(probe, self.batch_size))
        self.outputs, self.bytes = {}, 0
        return [[int(per_token * t) for t in batch_tokens(enc, self.batch_size)] for enc in prompt_sets]

    def layer_bytes(self, prompt_sets: Sequence[PromptSet], layer: int) -> int:
        """Bytes the cache of one layer takes for ``prompt_sets``."""
        return sum(sum(sizes) for sizes in self.batch_bytes(prompt_sets, layer))

    def capture(self, prompt_sets: Sequence[PromptSet], layers: Sequence[int]) -> list[AnyScores]:
        """Score the unedited model on each prompt set, keeping the outputs ``layers`` need."""
        blocks = self.model.get_submodule(self.blocks_path)
        assert isinstance(blocks, nn.ModuleList)  # checked on construction
        needed = sorted({layer - 1 for layer in layers if layer > 0})
        self.outputs = {b: [] for b in needed}
        handles = []
        for b in needed:

            def keep(module: nn.Module, args: object, output: object, b: int = b) -> None:
                self.outputs[b][-1].append(output)

            handles.append(blocks[b].register_forward_hook(keep))
        scores = []
        try:
            for enc in prompt_sets:
                for b in needed:
                    self.outputs[b].append([])
                scores.append(self.evaluate(enc))
        finally:
            for handle in handles:
                handle.remove()
        self.bytes = sum(nbytes(v) for sets in self.outputs.values() for outs in sets for v in outs)
        return scores

    def score(
        self, layer: int, prompt_sets: Sequence[PromptSet], which: Sequence[int] | None = None
    ) -> list[AnyScores]:
        """Scores of the sets numbered ``which`` (of those captured), blocks before ``layer`` replayed."""
        which = range(len(prompt_sets)) if which is None else which
        out = []
        for i in which:
            with self.replaying(layer, i):
                out.append(self.evaluate(prompt_sets[i]))
        return out

    def evaluate(self, enc: PromptSet) -> AnyScores:
        """Scores of ``enc`` with the model as it is (the head at the positions the metrics read)."""
        if isinstance(enc, AnswerSet):
            return score_answers(self.model, enc.encoded, self.batch_size)
        return score(self.lm, enc, self.batch_size)

    @contextlib.contextmanager
    def replaying(self, layer: int, index: int) -> Iterator[None]:
        """Blocks ``0..layer-1`` swapped for stubs replaying prompt set ``index``'s cached batches."""
        if layer == 0:
            yield
            return
        if layer - 1 not in self.outputs:
            raise RuntimeError(f"no cached prefix for layer {layer}: capture it first")
        replay = _Replay(self.outputs[layer - 1][index])
        stubs = {f"{self.blocks_path}.{b}": CachedBlock(replay, first=b == 0) for b in range(layer)}
        with replace_modules_(self.model, stubs):
            yield
