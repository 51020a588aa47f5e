"""Selection rules, splits, several tasks at once, and greedy composition that rejects exactly."""

from __future__ import annotations

import copy
import hashlib

import pytest
from test_answers import tiny_lm  # the tests folder is on sys.path (pytest rootdir-less import)
from torch import nn

from fasttrunc.edits import Edit, apply_edits
from fasttrunc.selection import (
    Candidate,
    StackedEdits,
    best_index,
    combined_key,
    compose_greedy,
    selection_key,
    split_examples,
)
from fasttrunc.tasks.answers import aggregate_answers, encode_answers, score_answers
from fasttrunc.tasks.user import Example


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- rules and splits ---------------------------------------------------------------------------


def test_accuracy_ties_break_on_lower_log_loss_and_any_metric_selects():
    cells = [
        {"accuracy": 0.5, "log_loss": 2.0, "mean_log_prob": -3.0},
        {"accuracy": 0.7, "log_loss": 1.5, "mean_log_prob": -4.0},
        {"accuracy": 0.7, "log_loss": 1.2, "mean_log_prob": -2.0},
        {"accuracy": 0.7, "log_loss": 1.2, "mean_log_prob": -1.0},
    ]
    assert best_index(cells, "accuracy") == 2  # 2 and 3 tie on both: the first in grid order
    assert best_index(cells, "log_loss") == 2
    assert best_index(cells, "mean_log_prob") == 3
    assert selection_key(cells[0], "accuracy") == (0.5, -2.0)
    assert selection_key({"accuracy": 0.5}, "accuracy") == (0.5,)  # metrics without log-loss
    with pytest.raises(ValueError, match="cannot select by 'p_the'.*accuracy, log_loss"):
        best_index(cells, "p_the")


def test_several_tasks_combine_relative_to_their_baselines():
    baseline = {"a": {"accuracy": 0.5, "log_loss": 2.0}, "b": {"accuracy": 0.0, "log_loss": 4.0}}
    cell = {"a": {"accuracy": 0.6, "log_loss": 1.0}, "b": {"accuracy": 0.1, "log_loss": 5.0}}
    key = combined_key(cell, baseline, "accuracy")
    assert key[0] == pytest.approx(((0.6 - 0.5) / 0.5 + (0.1 - 0.0) / 1e-3) / 2)
    assert key[1] == pytest.approx(((-1.0 + 2.0) / 2.0 + (-5.0 + 4.0) / 4.0) / 2)
    assert combined_key(baseline, baseline, "log_loss") == (0.0,)
    with pytest.raises(ValueError, match=r"no baseline metrics for tasks \['c'\]"):
        combined_key({"c": cell["a"]}, baseline, "accuracy")


def test_splits():
    laser = split_examples(10, 0.2, mode="laser")
    assert (laser.select, laser.report, laser.seed) == ((0, 1), tuple(range(2, 10)), None)
    shuffled = split_examples(50, 0.2, seed=3)
    assert len(shuffled.select) == 10 and shuffled.mode == "shuffled" and shuffled.seed == 3
    assert sorted(shuffled.select + shuffled.report) == list(range(50))
    assert list(shuffled.select) == sorted(shuffled.select)
    assert split_examples(50, 0.2, seed=3) == shuffled
    assert split_examples(50, 0.2, seed=4).select != shuffled.select
    assert shuffled.select != laser.select[:10]
    assert len(split_examples(2, 0.01).select) == 1
    with pytest.raises(ValueError, match="split 'first' is not known"):
        split_examples(10, mode="first")
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_examples(1)


# --- composition --------------------------------------------------------------------------------


def three_layers() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6))


def test_greedy_with_a_synthetic_score_rejects_a_non_improving_step_exactly():
    model = three_layers()
    original = state_hash(model)
    gain = {("0", 1): 1.0, ("0", 2): 3.0, ("1", 1): 0.0, ("1", 2): -1.0, ("2", 4): 5.0}

    def score(m: nn.Module) -> float:  # reads the model: the gain of every truncated module
        return sum(gain[(name, mod.rank)] for name, mod in m.named_children() if hasattr(mod, "rank"))

    stack = StackedEdits(model)
    hashes: list[str] = []

    def settle(edits):
        stack.sync(edits)
        hashes.append(state_hash(model))

    candidates = [Candidate(int(name), (Edit(name, rank),)) for name, rank in gain]
    start = [Edit("2", 4)]
    settle(start)
    result = compose_greedy(stack.evaluator(score), candidates, start, order="descending", settle=settle)
    # layer 2 is already edited (skipped), layer 1 gains at best 0 (rejected: not strict), layer 0 gains 3
    assert result.edits == [Edit("2", 4), Edit("0", 2)]
    assert result.start_score == 5.0 and result.steps == [((Edit("0", 2),), 8.0)] and result.score == 8.0
    assert [(t.layer, t.edits[0].rank, t.score, t.accepted) for t in result.trials] == [
        (1, 1, 5.0, False),
        (1, 2, 4.0, False),
        (0, 1, 6.0, False),
        (0, 2, 8.0, True),
    ]
    assert hashes[1] == hashes[0]  # after the rejected layer-1 step: bit-identical to before it
    assert hashes[2] != hashes[1]
    stack.restore()
    assert state_hash(model) == original
    ascending = compose_greedy(stack.evaluator(score), candidates, [], start_score=0.0, order="ascending")
    assert [e.module for e in ascending.edits] == ["0", "2"]


@pytest.fixture(scope="module")
def word_model():
    from fasttrunc.models.tiny_neox import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(["Mary", "John", "Tom", "Anna"])
    return tiny_lm("neox", len(tokenizer), seed=5), tokenizer


def test_greedy_with_a_real_metric_rejects_an_equal_step_and_restores_bit_exactly(word_model):
    model, tokenizer = word_model
    examples = [
        Example(prompt="Mary gave the book to", answer="John", line=1, distractor="Mary"),
        Example(prompt="then Tom went to the", answer="park .", line=2),
        Example(prompt="Anna and Tom went to the", answer="store", line=3, choices=("store", "garden")),
        Example(prompt="John went to the", answer="garden", line=4),
    ]
    encoded = encode_answers(tokenizer, examples)

    def score(m: nn.Module):
        return selection_key(aggregate_answers(score_answers(m, encoded)), "accuracy")

    original = state_hash(model)
    stack = StackedEdits(model)
    out = "gpt_neox.layers.{}.mlp.dense_4h_to_h"
    # layer 0: remove-top at rank 0 is W itself, so the score is exactly the current one and must be rejected
    candidates = [Candidate(0, (Edit(out.format(0), 0, "remove-top"),))]
    candidates += [Candidate(1, (Edit(out.format(1), r, k),)) for r in (1, 4) for k in ("keep-top", "magnitude")]
    hashes: list[tuple[str, list[Edit]]] = []

    def settle(edits):
        stack.sync(edits)
        hashes.append((state_hash(model), list(edits)))

    settle([])
    base_score = score(model)
    result = compose_greedy(stack.evaluator(score), candidates, [], start_score=base_score, settle=settle)
    layer0 = [t for t in result.trials if t.layer == 0]
    assert layer0 and not any(t.accepted for t in layer0)
    before_layer0 = result.steps[0][1] if result.steps else base_score  # layer 1 is visited first
    assert [t.score for t in layer0] == [before_layer0]
    # after every layer the model is exactly the accepted edits applied to a fresh copy of it
    for digest, edits in hashes:
        stack.sync([])
        fresh = copy.deepcopy(model)
        if edits:
            apply_edits(fresh, edits)
        assert digest == state_hash(fresh)
    assert hashes[-1][0] == hashes[-2][0]  # the rejected layer-0 step left the model as before it
    assert state_hash(model) == original
