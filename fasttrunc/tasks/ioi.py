"""Indirect object identification (IOI) prompts, after Wang et al. (2022).

"Then, Mary and John went to the store. John gave a drink to" -> " Mary". The indirect object
(IO) appears once in the first clause, the subject (S) twice; the answer is the IO. Both name
orders are built: ABBA (IO first) and BABA (S first). Names are kept only when they are a single
token in running text under the model's tokenizer (after a space, in that tokenizer's own
convention: see :mod:`fasttrunc.tasks.tokens`), so that P(IO) and P(S) are the probabilities of
one next token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from fasttrunc import checks
from fasttrunc.tasks.metrics import Prompt
from fasttrunc.tasks.tokens import known_words, word_token_ids

# Each template names the two people in the first clause ({first}, {second}), then the subject
# ({subject}) hands something over; the prompt ends right before the indirect object.
TEMPLATES: tuple[str, ...] = (
    "Then, {first} and {second} went to the {place}. {subject} gave a {object} to",
    "When {first} and {second} went to the {place}, {subject} gave a {object} to",
    "After {first} and {second} went to the {place}, {subject} gave a {object} to",
    "Afterwards, {first} and {second} went to the {place}. {subject} gave a {object} to",
    "While {first} and {second} were working at the {place}, {subject} gave a {object} to",
    "Then, {first} and {second} had a long day at the {place}. {subject} handed a {object} to",
    "When {first} and {second} arrived at the {place}, {subject} passed a {object} to",
    "Friends {first} and {second} met at the {place}. {subject} offered a {object} to",
)

# Wang et al.'s places and objects (every object takes the article "a").
PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

# Common English first names. Some split into several GPT-NeoX tokens (Brittany, Danielle,
# Kimberly, Tiffany, Samantha, ...) and are dropped by the single-token filter.
NAMES: tuple[str, ...] = (
    "Mary",
    "John",
    "Tom",
    "James",
    "Michael",
    "Robert",
    "David",
    "William",
    "Richard",
    "Joseph",
    "Thomas",
    "Charles",
    "Daniel",
    "Matthew",
    "Anthony",
    "Mark",
    "Paul",
    "Steven",
    "Andrew",
    "Kevin",
    "Brian",
    "George",
    "Edward",
    "Ryan",
    "Jacob",
    "Eric",
    "Jonathan",
    "Justin",
    "Scott",
    "Frank",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Lisa",
    "Nancy",
    "Betty",
    "Sandra",
    "Ashley",
    "Emily",
    "Michelle",
    "Amanda",
    "Melissa",
    "Rachel",
    "Laura",
    "Anna",
    "Alice",
    "Kate",
    "Rose",
    "Grace",
    "Julia",
    "Emma",
    "Lucy",
    "Helen",
    "Amy",
    "Brittany",
    "Danielle",
    "Kimberly",
    "Tiffany",
    "Samantha",
    "Stephanie",
    "Christina",
    "Veronica",
)


def ioi_names(tokenizer: Any, names: Sequence[str] = NAMES) -> list[str]:
    """The names that are one token in running text under ``tokenizer``."""
    return list(word_token_ids(tokenizer, names))


def build_ioi_prompts(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    *,
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
    templates: Sequence[str] = TEMPLATES,
) -> list[Prompt]:
    """``n`` IOI prompts, half ABBA and half BABA (alternating), drawn with ``seed``.

    Names are filtered to single tokens, places and objects to words the tokenizer knows (a
    word-level tokenizer maps unknown words to its unknown token). Every prompt has two distinct
    names; the same seed gives the same prompts.
    """
    checks.positive("n", n)
    ids = word_token_ids(tokenizer, names)
    usable = list(ids)
    if len(usable) < 2:
        raise ValueError(
            f"only {len(usable)} of {len(names)} names are single tokens under this tokenizer; IOI needs at least 2"
        )
    places_ok = known_words(tokenizer, places)
    objects_ok = known_words(tokenizer, objects)
    if not places_ok or not objects_ok:
        raise ValueError("the tokenizer knows none of the IOI places or none of the objects")
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        io, s = rng.sample(usable, 2)
        template_index = rng.randrange(len(templates))
        order = "ABBA" if i % 2 == 0 else "BABA"
        first, second = (io, s) if order == "ABBA" else (s, io)
        text = templates[template_index].format(
            first=first, second=second, subject=s, place=rng.choice(places_ok), object=rng.choice(objects_ok)
        )
        prompts.append(
            Prompt(
                text=text,
                answer=" " + io,
                answer_id=ids[io],
                subject=" " + s,
                subject_id=ids[s],
                kind=f"ioi-{order}-t{template_index}",
            )
        )
    return prompts
