"""Prompt builders (IOI, factual recall) and the next-token metrics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fasttrunc.tasks import factual, ioi
from fasttrunc.tasks.metrics import Prompt, aggregate, encode_prompts, last_logits, score, the_token_id


@pytest.fixture
def neox_tokenizer(neox_tokenizer_path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_path))


@pytest.fixture(scope="module")
def word_tokenizer():
    from fasttrunc.models.tiny_neox import build_tiny_tokenizer

    return build_tiny_tokenizer(["Mary", "John", "Tom", "Anna", "Kate"])


# --- IOI ----------------------------------------------------------------------------------------


def test_ioi_names_are_single_tokens_under_the_real_tokenizer(neox_tokenizer):
    names = ioi.ioi_names(neox_tokenizer)
    for dropped in ("Brittany", "Danielle", "Kimberly", "Tiffany", "Samantha"):
        assert len(neox_tokenizer.encode(" " + dropped, add_special_tokens=False)) > 1
        assert dropped not in names
    assert "Mary" in names and "John" in names
    assert the_token_id(neox_tokenizer) == 253


def test_ioi_prompts_with_the_real_tokenizer(neox_tokenizer):
    prompts = ioi.build_ioi_prompts(neox_tokenizer, 40, seed=3)
    assert len(prompts) == 40
    assert {p.kind.split("-")[1] for p in prompts} == {"ABBA", "BABA"}
    mary = [p for p in prompts if p.answer == " Mary"]
    assert all(p.answer_id == 6393 for p in mary)
    for p in prompts:
        io, s = p.answer.strip(), p.subject.strip()
        assert io != s
        words = p.text.replace(",", " ").replace(".", " ").split()
        assert words.count(io) == 1 and words.count(s) == 2
        assert neox_tokenizer.encode(p.answer, add_special_tokens=False) == [p.answer_id]
        assert neox_tokenizer.encode(p.subject, add_special_tokens=False) == [p.subject_id]
        assert p.text.endswith(" to")
        first, second = (io, s) if "ABBA" in p.kind else (s, io)
        assert p.text.index(first) < p.text.index(second)
    assert ioi.build_ioi_prompts(neox_tokenizer, 40, seed=3) == prompts
    assert ioi.build_ioi_prompts(neox_tokenizer, 40, seed=4) != prompts


def test_ioi_filters_unknown_words_of_a_word_level_tokenizer(word_tokenizer):
    assert ioi.ioi_names(word_tokenizer) == ["Mary", "John", "Tom", "Anna", "Kate"]
    prompts = ioi.build_ioi_prompts(word_tokenizer, 10, seed=0)
    unk = word_tokenizer.unk_token_id
    for p in prompts:
        assert unk not in word_tokenizer.encode(p.text, add_special_tokens=False)
    with pytest.raises(ValueError, match="single tokens"):
        ioi.build_ioi_prompts(word_tokenizer, 10, names=["Mary", "Brittany"])


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_ioi_bad_count(word_tokenizer, n):
    with pytest.raises(ValueError, match="n"):
        ioi.build_ioi_prompts(word_tokenizer, n)


# --- factual ------------------------------------------------------------------------------------


def test_factual_set_is_shipped_and_filtered(neox_tokenizer):
    facts = factual.factual_facts()
    assert len(facts) >= 60
    assert {f["category"] for f in facts} >= {"city", "landmark", "company", "person"}
    prompts = factual.build_factual_prompts(neox_tokenizer, seed=0)
    assert 60 <= len(prompts) < len(facts)  # Corsica is two tokens
    assert all(p.answer != " Corsica" for p in prompts)
    paris = [p for p in prompts if p.answer == " Paris"]
    assert paris and all(p.answer_id == 7785 for p in paris)
    assert {p.text for p in factual.build_factual_prompts(neox_tokenizer, seed=1)} == {p.text for p in prompts}
    assert factual.build_factual_prompts(neox_tokenizer, 10, seed=0) == prompts[:10]
    with pytest.raises(ValueError, match=f"exceeds the {len(prompts)} factual prompts"):
        factual.build_factual_prompts(neox_tokenizer, len(prompts) + 1)


def test_factual_needs_known_answers(word_tokenizer):
    with pytest.raises(ValueError, match="no factual answer"):
        factual.build_factual_prompts(word_tokenizer)


# --- metrics ------------------------------------------------------------------------------------


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits at every position are one fixed row per prompt (by first token)."""

    def __init__(self, rows: dict[int, list[float]]):
        super().__init__()
        self.rows = rows
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **kwargs):
        logits = torch.stack([torch.tensor(self.rows[int(i)]) for i in input_ids[:, 0]])
        return SimpleNamespace(logits=logits[:, None, :].expand(-1, input_ids.shape[1], -1))


class ToyTokenizer:
    """Words ``w0 .. w4`` are ids 0..4; " the" is id 1 and "a" id 4; no special tokens."""

    unk_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [{"the": 1, "a": 4}.get(w) or int(w[1:]) for w in text.split()]


def test_metrics_on_a_hand_computed_example():
    # Prompt A: probabilities (0.5, 0.25, 0.125, 0.125) -> correct = id 0, subject = id 2.
    # Prompt B: probabilities (0.1, 0.4, 0.1, 0.4)      -> correct = id 3, no subject.
    rows = {0: [math.log(p) for p in (0.5, 0.25, 0.125, 0.125)], 4: [math.log(p) for p in (0.1, 0.4, 0.1, 0.4)]}
    prompts = [
        Prompt(text="w0 w2 w3", answer=" w0", answer_id=0, subject=" w2", subject_id=2),
        Prompt(text="w4 w4", answer=" w3", answer_id=3),
    ]
    scores = score(FixedLogits(rows), encode_prompts(ToyTokenizer(), prompts), batch_size=2)
    m = aggregate(scores)
    assert m.n == 2
    assert m.mean_p_correct == pytest.approx((0.5 + 0.4) / 2)
    assert m.mean_p_the == pytest.approx((0.25 + 0.4) / 2)
    assert m.mean_p_subject == pytest.approx(0.125)
    assert m.mean_of_ratios == pytest.approx((0.5 / 0.25 + 0.4 / 0.4) / 2)  # 1.5
    assert m.ratio_of_means == pytest.approx(0.45 / 0.325)
    assert m.accuracy == pytest.approx(0.5)  # B: ids 1 and 3 tie, argmax picks 1
    assert m.mean_logit_diff == pytest.approx(math.log(0.5 / 0.125))
    assert m.logit_diff_accuracy == 1.0
    assert scores.per_prompt()[1].p_subject is None


@pytest.fixture(scope="module")
def random_neox(word_tokenizer):
    from fasttrunc.models.tiny_neox import TinyNeoxConfig, tiny_neox_model

    tok = word_tokenizer
    torch.manual_seed(1)
    model = tiny_neox_model(
        len(tok),
        TinyNeoxConfig(hidden_size=32, num_layers=2, intermediate_size=64),
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    return model.eval()


def test_batch_equals_one_by_one(random_neox, word_tokenizer):
    prompts = ioi.build_ioi_prompts(word_tokenizer, 12, seed=5)
    lengths = {len(word_tokenizer.encode(p.text)) for p in prompts}
    assert len(lengths) > 1  # padding is really exercised
    encoded = encode_prompts(word_tokenizer, prompts)
    batched = score(random_neox, encoded, batch_size=5)
    single = score(random_neox, encoded, batch_size=1)
    for field in ("p_correct", "p_the", "p_subject", "logit_diff"):
        torch.testing.assert_close(getattr(batched, field), getattr(single, field), rtol=1e-4, atol=1e-6)
    assert torch.equal(batched.top1, single.top1)


def test_last_logits_head_only_matches_full_forward(random_neox, word_tokenizer):
    encoded = encode_prompts(word_tokenizer, ioi.build_ioi_prompts(word_tokenizer, 6, seed=2))
    with torch.no_grad():
        fast = last_logits(random_neox, encoded.input_ids, encoded.attention_mask, encoded.last_index)
        full = random_neox(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask).logits
    torch.testing.assert_close(fast, full[torch.arange(6), encoded.last_index], rtol=1e-4, atol=1e-5)
