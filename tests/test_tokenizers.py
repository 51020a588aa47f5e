"""Tasks on any tokenizer: the " the" token, single-token words, BOS, padding sides.

Three conventions: the real GPT-NeoX byte-level BPE ("Ġthe"), a SentencePiece-style BPE built
here offline with the ``tokenizers`` library ("▁the", a ``<s>`` BOS added with special tokens,
no pad token; trained on tests/data/sentencepiece-corpus.txt), and the tiny model's word-level
tokenizer (no space marker).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from fasttrunc.tasks import factual, ioi, tokens
from fasttrunc.tasks.metrics import encode_prompts, score

CORPUS = Path(__file__).resolve().parent / "data" / "sentencepiece-corpus.txt"
# Large enough that every frequent word of the corpus is one piece, small enough to train in a
# few seconds; names and answers the corpus lacks stay split and are filtered out.
SP_VOCAB = 400


@functools.lru_cache(maxsize=4)
def sentencepiece_core(prepend_scheme: str = "first") -> Any:
    """A BPE over Metaspace pieces ("▁word"), as Llama 2 and Mistral tokenize; trained once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=SP_VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    core.train([str(CORPUS)], trainer)
    # The same vocabulary read with another prepend scheme (Gemma adds no "▁" at the start).
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    return core.to_str()


def sentencepiece_tokenizer(prepend_scheme: str = "first", template: str = "<s> $A") -> Any:
    """A fresh PreTrainedTokenizerFast over :func:`sentencepiece_core`, adding ``template``'s specials."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(sentencepiece_core(prepend_scheme))
    specials = [(t, core.token_to_id(t)) for t in ("<s>", "</s>") if t in template]
    core.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def neox(neox_tokenizer_path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_path))


@pytest.fixture
def sp():
    return sentencepiece_tokenizer()


@pytest.fixture
def word():
    from fasttrunc.models.tiny_neox import build_tiny_tokenizer

    return build_tiny_tokenizer(["Mary", "John", "Tom", "Anna", "Kate"])


@pytest.fixture(params=["neox", "sp", "sp-never", "word"])
def any_tokenizer(request, neox_tokenizer_path):
    if request.param == "neox":
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_path))
    if request.param == "sp":
        return sentencepiece_tokenizer()
    if request.param == "sp-never":
        return sentencepiece_tokenizer("never")
    from fasttrunc.models.tiny_neox import build_tiny_tokenizer

    return build_tiny_tokenizer(["Mary", "John", "Tom", "Anna", "Kate"])


# --- conventions ----------------------------------------------------------------------------------


def test_the_token_under_each_convention(neox, sp, word):
    assert neox.convert_ids_to_tokens(tokens.the_token_id(neox)) == "Ġthe"
    assert sp.convert_ids_to_tokens(tokens.the_token_id(sp)) == "▁the"
    assert word.convert_ids_to_tokens(tokens.the_token_id(word)) == "the"
    never = sentencepiece_tokenizer("never")
    assert never.convert_ids_to_tokens(tokens.the_token_id(never)) == "▁the"
    # A bare "the" at the start of a text is another token under "never" ("the" or split), so
    # the id must come from running text, not from encoding the word alone.
    assert never.encode("the", add_special_tokens=False) != [tokens.the_token_id(never)]


def test_special_prefix_is_what_the_tokenizer_adds(neox, sp, word):
    assert tokens.special_prefix(neox) == []  # GPT-NeoX adds no BOS
    assert tokens.special_prefix(word) == []
    assert tokens.special_prefix(sp) == [sp.bos_token_id]
    appends_eos = sentencepiece_tokenizer(template="<s> $A </s>")
    assert appends_eos.encode("a", add_special_tokens=True)[-1] == appends_eos.eos_token_id
    assert tokens.special_prefix(appends_eos) == [appends_eos.bos_token_id]  # the EOS is not kept


def test_prompts_start_with_bos_only_where_the_tokenizer_adds_one(neox, sp):
    for tok, first in ((neox, None), (sp, sp.bos_token_id)):
        prompts = ioi.build_ioi_prompts(tok, 6, seed=0)
        encoded = encode_prompts(tok, prompts, padding_side="right")
        for row, p, last in zip(encoded.input_ids, prompts, encoded.last_index):
            own = tok.encode(p.text, add_special_tokens=False)
            head = [] if first is None else [first]
            assert row[: int(last) + 1].tolist() == head + own


def test_eos_appended_by_the_tokenizer_is_not_read():
    tok = sentencepiece_tokenizer(template="<s> $A </s>")
    prompts = ioi.build_ioi_prompts(tok, 4, seed=1)
    encoded = encode_prompts(tok, prompts, padding_side="right")
    for row, last, p in zip(encoded.input_ids, encoded.last_index, prompts):
        assert int(row[int(last)]) == tok.encode(p.text, add_special_tokens=False)[-1] != tok.eos_token_id


def test_answers_are_the_next_token_of_their_prompt(any_tokenizer):
    """Under every convention, prompt + answer encodes as the prompt's tokens plus the answer id."""
    tok = any_tokenizer
    prompts = ioi.build_ioi_prompts(tok, 30, seed=2)
    try:
        prompts += factual.build_factual_prompts(tok)
    except ValueError as exc:  # the word-level tokenizer knows no factual answer
        assert "no factual answer" in str(exc)
    the_id = tokens.the_token_id(tok)
    for p in prompts:
        own = tokens.token_ids(tok, p.text)
        assert tokens.token_ids(tok, p.text + p.answer) == own + [p.answer_id], p
        assert tokens.token_ids(tok, p.text + " the") == own + [the_id]
        if p.subject is not None:
            assert tokens.token_ids(tok, p.text + p.subject) == own + [p.subject_id]


def test_filters_follow_the_tokenizer(neox, sp):
    # Names the SentencePiece corpus never contains are split there, and dropped; the real
    # GPT-NeoX vocabulary has them whole.
    sp_names, neox_names = ioi.ioi_names(sp), ioi.ioi_names(neox)
    for name in ("Jennifer", "Richard", "Thomas"):
        assert name in neox_names and name not in sp_names
        assert len(tokens.word_ids(sp, name)) > 1
    assert {"Mary", "John", "Anna"} <= set(sp_names)
    sp_answers = {p.answer for p in factual.build_factual_prompts(sp)}
    corpus_words = set(CORPUS.read_text().replace(".", " ").replace(",", " ").split())
    assert " Spain" in sp_answers
    for answer in ("Australia", "Tesla", "London"):  # not in the corpus: split, and dropped
        assert answer not in corpus_words and f" {answer}" not in sp_answers
        assert len(tokens.word_ids(sp, answer)) > 1


# --- padding ----------------------------------------------------------------------------------------


def test_pad_id_without_a_pad_token_changes_nothing(sp):
    assert sp.pad_token is None
    size = len(sp)
    encoded = encode_prompts(sp, ioi.build_ioi_prompts(sp, 8, seed=0), padding_side="left")
    assert tokens.pad_id(sp) == sp.eos_token_id
    assert sp.pad_token is None and len(sp) == size  # the tokenizer (and so the vocabulary) is unchanged
    assert bool((encoded.input_ids[encoded.attention_mask == 0] == sp.eos_token_id).all())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_layout(sp, side):
    prompts = ioi.build_ioi_prompts(sp, 10, seed=4)
    encoded = encode_prompts(sp, prompts, padding_side=side)
    lengths = encoded.attention_mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1
    rows = zip(prompts, encoded.input_ids, encoded.attention_mask, encoded.last_index, lengths)
    for p, row, mask, last, n in rows:
        assert row[mask.bool()].tolist() == tokens.prompt_ids(sp, p.text)
        ones = torch.nonzero(mask).flatten()
        assert int(ones[-1] - ones[0] + 1) == int(n)
        assert int(last) == int(ones[-1])
        assert (int(ones[0]) == 0) if side == "right" else (int(ones[-1]) == mask.shape[0] - 1)


def test_padding_side_defaults_to_the_tokenizers_and_is_checked(sp):
    sp.padding_side = "left"
    encoded = encode_prompts(sp, ioi.build_ioi_prompts(sp, 6, seed=0))
    assert bool(encoded.attention_mask[:, -1].all()) and not bool(encoded.attention_mask[:, 0].all())
    with pytest.raises(ValueError, match="padding side 'middle'"):
        encode_prompts(sp, ioi.build_ioi_prompts(sp, 2, seed=0), padding_side="middle")


def _tiny(kind: str, vocab: int, tok: Any) -> torch.nn.Module:
    import transformers

    common: dict[str, Any] = dict(vocab_size=vocab, pad_token_id=None, bos_token_id=tok.bos_token_id)
    if kind == "llama":
        config: Any = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            eos_token_id=tok.eos_token_id, **common,
        )  # fmt: skip
        model_cls: Any = transformers.LlamaForCausalLM
    elif kind == "gpt2":  # learned absolute positions: left padding needs the position ids
        config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=tok.eos_token_id, **common
        )
        model_cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **common
        )
        model_cls = transformers.GPTNeoXForCausalLM
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "neox"])
def test_batch_equals_one_prompt_at_a_time(sp, word, kind, side):
    tok = sp if kind == "llama" else word
    model = _tiny(kind, len(tok), tok)
    prompts = ioi.build_ioi_prompts(tok, 10, seed=6)
    encoded = encode_prompts(tok, prompts, padding_side=side)
    assert len(set(encoded.attention_mask.sum(dim=1).tolist())) > 1  # padding is really exercised
    batched = score(model, encoded, batch_size=10)
    single = [score(model, encode_prompts(tok, [p], padding_side=side), batch_size=1) for p in prompts]
    for field in ("p_correct", "p_the", "p_subject", "logit_diff"):
        alone = torch.cat([getattr(s, field) for s in single])
        torch.testing.assert_close(getattr(batched, field), alone, rtol=1e-4, atol=1e-6)
    assert torch.equal(batched.top1, torch.cat([s.top1 for s in single]))


def test_a_raw_tokenizers_object_reads_like_its_wrapper(sp):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(sentencepiece_core())
    assert tokens.unk_id(raw) == sp.unk_token_id is not None
    words = ioi.NAMES + ("the", "store", "Spain")
    assert tokens.word_token_ids(raw, words) == tokens.word_token_ids(sp, words)
    assert tokens.known_words(raw, ioi.PLACES) == tokens.known_words(sp, ioi.PLACES)
