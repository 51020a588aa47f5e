"""Multi-token and choice scoring against direct computations on tiny random GPT-NeoX / Llama models."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fasttrunc.tasks.answers import aggregate_answers, answer_span, encode_answers, predictions, score_answers
from fasttrunc.tasks.user import Example, load_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"


@pytest.fixture(scope="module")
def neox_tokenizer():
    from transformers import PreTrainedTokenizerFast

    # the file the conftest fixture neox_tokenizer_path names; read here once per module
    return PreTrainedTokenizerFast(
        tokenizer_file=str(Path(__file__).resolve().parent / "data" / "gpt-neox-20b-tokenizer.json")
    )


def tiny_lm(family: str, vocab_size: int, seed: int):
    """A random 2-layer GPT-NeoX or Llama (grouped-query attention) of width 16, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    if family == "neox":
        config = transformers.GPTNeoXConfig(**sizes, intermediate_size=32, max_position_embeddings=64)
        return transformers.GPTNeoXForCausalLM(config).eval()
    config = transformers.LlamaConfig(**sizes, num_key_value_heads=1, intermediate_size=24, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def neox(neox_tokenizer):
    return tiny_lm("neox", len(neox_tokenizer), seed=1)


@pytest.fixture(scope="module")
def word_tokenizer():
    from fasttrunc.models.tiny_neox import build_tiny_tokenizer

    return build_tiny_tokenizer(["Mary", "John", "Tom", "Anna"])


@pytest.fixture(scope="module")
def llama(word_tokenizer):
    return tiny_lm("llama", len(word_tokenizer), seed=2)


@pytest.fixture(scope="module")
def capitals():
    """A few examples of the shipped factual file: single- and multi-token answers, with and without distractors."""
    examples = load_task(EXAMPLES / "capitals.jsonl").examples
    return [examples[i] for i in (0, 4, 9, 10, 12, 16, 18)]


def direct_log_prob(model, prompt_ids, answer_ids):
    """log P(answer | prompt) summed over the answer's tokens, from one unbatched forward."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    n = len(prompt_ids)
    return sum(float(logp[n - 1 + j, t]) for j, t in enumerate(answer_ids))


def test_summed_log_prob_matches_direct_computation(neox, neox_tokenizer, capitals):
    encoded = encode_answers(neox_tokenizer, capitals)
    scores = score_answers(neox, encoded, batch_size=3)
    multi = 0
    for i, example in enumerate(capitals):
        p_ids = neox_tokenizer.encode(example.prompt)
        a_ids = neox_tokenizer.encode(" " + example.answer)
        multi += len(a_ids) > 1
        assert int(scores.n_tokens[i]) == len(a_ids)
        assert float(scores.log_prob[i]) == pytest.approx(direct_log_prob(neox, p_ids, a_ids), abs=1e-4)
        if example.distractor is not None:
            d_ids = neox_tokenizer.encode(" " + example.distractor)
            expected = direct_log_prob(neox, p_ids, d_ids)
            assert float(scores.distractor_log_prob[i]) == pytest.approx(expected, abs=1e-4)
    assert multi >= 2  # the example file has multi-token answers under GPT-NeoX


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_one_at_a_time(neox, neox_tokenizer, capitals, side):
    encoded = encode_answers(neox_tokenizer, capitals)
    one = score_answers(neox, encoded, batch_size=1)
    batched = score_answers(neox, encoded, batch_size=4, padding_side=side)
    torch.testing.assert_close(batched.log_prob, one.log_prob, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.distractor_log_prob, one.distractor_log_prob, atol=1e-4, rtol=0, equal_nan=True)
    assert torch.equal(batched.rank, one.rank) and torch.equal(batched.correct, one.correct)


def test_choice_task_is_argmax_over_choices(neox, neox_tokenizer):
    task = load_task(EXAMPLES / "sentiment.csv")
    encoded = encode_answers(neox_tokenizer, task.examples)
    scores = score_answers(neox, encoded, batch_size=5)
    for i, example in enumerate(task.examples):
        p_ids = neox_tokenizer.encode(example.prompt)
        lps = [direct_log_prob(neox, p_ids, neox_tokenizer.encode(" " + c)) for c in example.choices]
        assert scores.choice_log_probs[i] == pytest.approx(lps, abs=1e-4)
        best = max(range(len(lps)), key=lambda j: lps[j])
        assert scores.predicted[i] == best
        assert bool(scores.correct[i]) == (example.choices[best] == example.answer)
        assert int(scores.rank[i]) == -1
    metrics = aggregate_answers(scores)
    assert metrics.accuracy == pytest.approx(float(scores.correct.double().mean()))
    assert metrics.top5_accuracy is None and metrics.mean_of_ratios is None
    rows = predictions(encoded, scores, [1, 0])
    assert [r.line for r in rows] == [3, 2]
    assert rows[0].predicted_choice == task.examples[1].choices[scores.predicted[1]]


def test_aggregates_follow_their_definitions(neox, neox_tokenizer):
    task = load_task(EXAMPLES / "capitals.jsonl")
    encoded = encode_answers(neox_tokenizer, task.examples)
    scores = score_answers(neox, encoded)
    m = aggregate_answers(scores)
    lp = scores.log_prob.tolist()
    n_tok = scores.n_tokens.tolist()
    assert m.n == len(task)
    assert m.log_loss == pytest.approx(sum(-a / b for a, b in zip(lp, n_tok)) / len(lp))
    assert m.mean_log_prob == pytest.approx(sum(lp) / len(lp))
    pairs = [(a, float(d)) for a, d in zip(lp, scores.distractor_log_prob) if not math.isnan(d)]
    assert m.n_distractor == len(pairs) == sum(e.distractor is not None for e in task.examples)
    assert m.mean_of_ratios == pytest.approx(sum(math.exp(a - d) for a, d in pairs) / len(pairs))
    mean_pa = sum(math.exp(a) for a, _ in pairs) / len(pairs)
    mean_pd = sum(math.exp(d) for _, d in pairs) / len(pairs)
    assert m.ratio_of_means == pytest.approx(mean_pa / mean_pd)
    single = [int(r) for r, k in zip(scores.rank, n_tok) if k == 1]
    assert m.top10_accuracy == pytest.approx(sum(r < 10 for r in single) / len(single))
    assert m.top5_accuracy <= m.top10_accuracy
    # a single-token answer's rank is the count of vocabulary entries above it at the last prompt position
    i = n_tok.index(1)
    ids = torch.tensor([neox_tokenizer.encode(task.examples[i].prompt)])
    with torch.no_grad():
        last = neox(input_ids=ids).logits[0, -1]
    target = neox_tokenizer.encode(" " + task.examples[i].answer)[0]
    assert int(scores.rank[i]) == int((last > last[target]).sum())
    assert bool(scores.correct[i]) == (int(last.argmax()) == target)


def test_llama_with_word_tokenizer_and_the_prefix_fallback(llama, word_tokenizer):
    examples = [
        Example(prompt="Mary gave the book to", answer="John", line=1, distractor="Mary"),
        Example(prompt="then Tom went to the", answer="park .", line=2),
        Example(prompt="Anna and Tom went to the", answer="store", line=3, choices=("store", "garden", "park")),
    ]
    fast = score_answers(llama, encode_answers(word_tokenizer, examples), batch_size=2, padding_side="left")
    # a tokenizer without offsets: the answer is what follows the prompt's own tokens
    plain = SimpleNamespace(
        encode=word_tokenizer.encode, all_special_ids=word_tokenizer.all_special_ids, pad_token_id=0
    )
    encoded = encode_answers(plain, examples)
    slow = score_answers(llama, encoded, batch_size=3)
    torch.testing.assert_close(fast.log_prob, slow.log_prob, atol=1e-4, rtol=0)
    assert fast.n_tokens.tolist() == [1, 2, 1]
    for i, example in enumerate(examples):
        p_ids = word_tokenizer.encode(example.prompt)
        a_ids = word_tokenizer.encode(" " + example.answer)
        assert float(slow.log_prob[i]) == pytest.approx(direct_log_prob(llama, p_ids, a_ids), abs=1e-4)


def test_answer_span_errors(word_tokenizer):
    ids, start, stop = answer_span(word_tokenizer, "Mary went to", " the park")
    assert word_tokenizer.convert_ids_to_tokens(ids[start:stop]) == ["the", "park"]
    with pytest.raises(ValueError, match="cannot locate the tokens"):
        answer_span(word_tokenizer, "", " the park")
    with pytest.raises(ValueError, match="line 4: cannot locate"):
        encode_answers(word_tokenizer, [Example(prompt="Mary", answer="  ", line=4)])
