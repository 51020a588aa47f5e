"""Tokenizer conventions the tasks depend on, read from the tokenizer itself.

A task's answer is one next token: the token a word becomes when it follows a space in running
text. How a tokenizer marks that space differs: byte-level BPE (GPT-2, GPT-NeoX, Llama 3) folds
it into the word's token ("ĠMary"), SentencePiece-style tokenizers (Llama 2, Mistral, Gemma) write
it as "▁" ("▁Mary"), and a word-level tokenizer drops it. Rather than guess the marker from
the vocabulary, :func:`word_token_ids` encodes the word after a probe word and keeps what the
word added; the same call then holds for every convention, including SentencePiece tokenizers
that encode a bare leading space as a token of its own.

Special tokens: a prompt starts with what the tokenizer adds in front of a text when asked for
special tokens (Llama's and Gemma's ``<s>`` / ``<bos>``; nothing for GPT-2 and GPT-NeoX), and
never with what it appends (an EOS after the prompt would hide the position being read).

Padding: prompts are padded on the tokenizer's ``padding_side`` with its pad token; a tokenizer
without one pads with its EOS (or BOS, or 0) id. Padded positions are masked, so which id fills
them does not matter, and neither the tokenizer nor the model's vocabulary is changed.

Works with Hugging Face tokenizers and with raw ``tokenizers.Tokenizer`` objects alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The word a probed word follows: short, common, one token under every tokenizer the tests use.
# Any word works when pre-tokenizers split at spaces, which is what keeps a token from spanning
# the probe and the word.
PROBE = "a"
PADDING_SIDES = ("left", "right")


def token_ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text`` (without special tokens unless asked)."""
    encoded = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(encoded.ids) if hasattr(encoded, "ids") else list(encoded)


def unk_id(tokenizer: Any) -> int | None:
    """The unknown token's id, or None when the tokenizer has none (byte-level BPE)."""
    value = getattr(tokenizer, "unk_token_id", None)
    if value is None and hasattr(tokenizer, "token_to_id") and hasattr(tokenizer, "get_vocab"):
        model = getattr(tokenizer, "model", None)  # a raw tokenizers.Tokenizer
        name = getattr(model, "unk_token", None)
        value = tokenizer.token_to_id(name) if isinstance(name, str) else None
    return value if isinstance(value, int) else None


def word_ids(tokenizer: Any, word: str) -> list[int]:
    """The ids ``word`` adds when it follows a space after :data:`PROBE` (its in-text tokens)."""
    base = token_ids(tokenizer, PROBE)
    full = token_ids(tokenizer, f"{PROBE} {word}")
    if full[: len(base)] != base:  # the probe and the word merged into one token: no clean split
        return token_ids(tokenizer, " " + word)
    return full[len(base) :]


def word_token_ids(tokenizer: Any, words: Sequence[str]) -> dict[str, int]:
    """word -> id for the words that are exactly one known token when they follow a space."""
    unk = unk_id(tokenizer)
    out: dict[str, int] = {}
    for word in words:
        ids = word_ids(tokenizer, word)
        if len(ids) == 1 and ids[0] != unk:
            out[word] = ids[0]
    return out


def known_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """The words whose tokens include no unknown token (every word passes a byte-level BPE)."""
    unk = unk_id(tokenizer)
    return [w for w in words if unk is None or unk not in word_ids(tokenizer, w)]


def the_token_id(tokenizer: Any) -> int:
    """The id of " the" under this tokenizer's conventions, the association every task measures against."""
    ids = word_token_ids(tokenizer, ["the"])
    if "the" not in ids:
        raise ValueError('" the" is not a single known token under this tokenizer; the tasks need it')
    return ids["the"]


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (a BOS, or nothing)."""
    plain = token_ids(tokenizer, PROBE)
    special = token_ids(tokenizer, PROBE, add_special_tokens=True)
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start]
    raise ValueError("cannot find a text's own tokens among the tokens this tokenizer gives it with special tokens")


def prompt_ids(tokenizer: Any, text: str, prefix: Sequence[int] | None = None) -> list[int]:
    """The ids a model reads for a prompt: :func:`special_prefix` then the text's own tokens."""
    head = special_prefix(tokenizer) if prefix is None else list(prefix)
    return head + token_ids(tokenizer, text)


def pad_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the pad token, else EOS, else BOS, else 0 (all masked)."""
    for attribute in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0


def padding_side(tokenizer: Any, side: str | None = None) -> str:
    """``side`` when given, else the tokenizer's ``padding_side`` (right when it has none), checked."""
    chosen = side if side is not None else getattr(tokenizer, "padding_side", "right")
    if chosen not in PADDING_SIDES:
        raise ValueError(f"padding side {chosen!r} is not one of: {', '.join(PADDING_SIDES)}")
    return str(chosen)
