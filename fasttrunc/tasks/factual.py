"""Factual recall prompts: "Madrid is located in" -> " Spain", against the global " the".

The prompts ship with the package (``factual.json``: cities, landmarks, companies, people). Each
answer must be one token in running text under the model's tokenizer (after a space, in that
tokenizer's convention: see :mod:`fasttrunc.tasks.tokens`); prompts whose answer is not are
dropped.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from importlib import resources
from typing import Any

from fasttrunc import checks
from fasttrunc.tasks.metrics import Prompt
from fasttrunc.tasks.tokens import word_token_ids


@lru_cache(maxsize=1)
def factual_facts() -> tuple[dict[str, str], ...]:
    """The shipped facts: ``{"prompt", "answer", "category"}`` each, in file order."""
    text = resources.files("fasttrunc.tasks").joinpath("factual.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def build_factual_prompts(tokenizer: Any, n: int | None = None, seed: int = 0) -> list[Prompt]:
    """The facts whose answer is a single token, shuffled with ``seed``; the first ``n`` of them.

    ``n`` larger than the usable facts is a ValueError that says how many there are.
    """
    facts = factual_facts()
    ids = word_token_ids(tokenizer, sorted({f["answer"] for f in facts}))
    usable = [f for f in facts if f["answer"] in ids]
    if not usable:
        raise ValueError("no factual answer is a single token under this tokenizer")
    if n is not None:
        checks.positive("n", n)
        if n > len(usable):
            raise ValueError(
                f"n {n} exceeds the {len(usable)} factual prompts whose answer is one token here; allowed: 1..{len(usable)}"
            )
    random.Random(seed).shuffle(usable)
    chosen = usable if n is None else usable[:n]
    return [
        Prompt(text=f["prompt"], answer=" " + f["answer"], answer_id=ids[f["answer"]], kind=f"factual-{f['category']}")
        for f in chosen
    ]
