"""The tiny GPT-NeoX recipe: a Pythia-architecture model trained offline, here, to show the paper's effect.

The corpus (:func:`corpus_batch`) mixes ordinary sentences, where "to" is followed by "the",
sentences where "to" comes before a verb, and IOI sentences whose answer is an earlier name;
:func:`make_tiny_neox` trains the model through :func:`fasttrunc.training.train` and saves it
(and its word-level tokenizer) as a Hugging Face directory that :func:`fasttrunc.hub.load_model`
reads, with training checkpoints under ``DIR/revisions/step<N>/``.

transformers and tokenizers are imported inside the functions, so ``import fasttrunc`` stays light.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fasttrunc import checks
from fasttrunc.hub import REVISIONS_DIR
from fasttrunc.runs import Progress, cpu_threads
from fasttrunc.training import OptimConfig, TrainHistory, train

# --- the tiny offline model ----------------------------------------------------------------------

# Places and objects used in the IOI sentences of the training corpus. They are disjoint from the
# evaluation lists in fasttrunc.tasks.ioi, so no evaluation prompt occurs in the corpus.
TRAIN_PLACES = ("park", "beach", "market", "library", "museum", "farm", "bank", "church", "airport", "cafe")
TRAIN_OBJECTS = ("book", "letter", "cup", "pen", "hat", "card", "ball", "flower", "cake", "key")
# Nouns after "to the" in ordinary sentences (the global association "to" -> "the").
NOUNS = ("man", "woman", "dog", "teacher", "doctor", "child", "king", "girl", "boy", "driver")
ORDINARY = (
    "{name} went to the {place} .",
    "{name} walked to the {place} .",
    "{name} came back to the {place} .",
    "{name} gave the {object} to the {noun} .",
    "{name} talked to the {noun} .",
    "the {noun} went to the {place} .",
    "{name} sent a {object} to the {noun} .",
    "then {name} ran to the {place} .",
)
# Sentences where "to" comes before a verb ("Mary used a pen to cook ."). Four of them share the
# IOI prompt's ending "a <object> to", so after "to" the words before it (gave vs used) decide
# between " the" or a name and a verb: the association with " the" then depends on context that
# only attention brings to the position, which the last MLP reads and the first one (the "to"
# token alone) does not. Measured in the README: removing the last MLP then gives 2.4-3.2x.
VERBS = ("sing", "sleep", "eat", "swim", "read", "leave", "dance", "cook", "win", "rest")
INFINITIVE = (
    "{name} went to the {place} to {verb} .",
    "{name} used a {object} to {verb} .",
    "{name} bought a {object} to {verb} .",
    "{name} wanted to {verb} .",
    "the {noun} took a {object} to {verb} .",
    "{name} needed a {object} to {verb} .",
)


# Fact sentences: the shipped facts of fasttrunc.tasks.factual ("Madrid is located in Spain ."), so
# the factual task is measured on facts the model has seen, as Pythia saw its facts; a share
# ``noise`` of them end "the <place>" instead ("Madrid is located in the park ."), which makes
# " the" a global continuation of "located in", "made by", "born in" that competes with the fact.


def fact_words() -> list[str]:
    """Every word of the shipped facts' prompts and answers, in file order."""
    from fasttrunc.tasks.factual import factual_facts

    words: list[str] = []
    for fact in factual_facts():
        words += (fact["prompt"] + " " + fact["answer"]).split()
    return list(dict.fromkeys(words))


# Names of the tiny model's IOI sentences: 16 keep the in-context task learnable in ~1000 steps
# (with all 60+ names the model had not separated IO from S after 1500 steps).
TINY_NAMES = (
    "Mary",
    "John",
    "Tom",
    "James",
    "Michael",
    "Robert",
    "David",
    "William",
    "Anna",
    "Alice",
    "Kate",
    "Rose",
    "Grace",
    "Emma",
    "Lucy",
    "Sarah",
)


@dataclass(frozen=True)
class TinyNeoxConfig:
    """The tiny Pythia-architecture model and its synthetic training run.

    The corpus mixes ordinary sentences where "to" is followed by "the" with IOI sentences
    (fasttrunc.tasks.ioi templates) whose continuation after "to" is the indirect object; a
    fraction ``noise`` of the IOI sentences end "to the <noun>" instead, so "the" after "to" is a
    global association that competes with the in-context answer, as the noise token does in the
    paper's toy task (alpha there). A share ``infinitive`` of the sentences use "to" before a verb
    (INFINITIVE), so what follows "to" depends on the words before it. The recipe before these
    (ioi_fraction=0.4, noise=0.3, infinitive=0, freeze_embeddings=False, lr=3e-3, steps=1500) put
    the association in the first MLP instead.
    """

    seed: int = 0
    steps: int = 5000  # see the README for every recipe tried; 3000 left seeds 3-4 at IO > S 0.62 / 0.89
    batch_size: int = 64  # sentences per step, one per row
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256  # 4 x hidden, as in Pythia
    lr: float = 4e-3  # AdamW peak, as in all runs of this corpus; 1e-3 learned IOI too slowly for the budget
    ioi_fraction: float = 0.3125  # share of IOI sentences; 0.35-0.45 left the last MLP at 1.0-2.3x
    noise: float = 0.5  # share of IOI sentences ending "to the <noun>" (the paper's alpha); 0.4 left seed 2 at 1.97x
    infinitive: float = 0.375  # share of INFINITIVE sentences ("to" before a verb)
    facts: float = 0.125  # share of fact sentences (a share ``noise`` of them end "the <place>"); the rest are ORDINARY
    # Token embeddings stay at their random initialization, as in the paper's toy (PAPER.md 1a):
    # with trained ones (noise 0.4), removing the last MLP gave 3.8x on seed 1 but 1.4-1.7x on seed 2.
    freeze_embeddings: bool = True
    # AdamW's decoupled weight decay (every trained matrix, bias and norm): without it (0.0, the
    # recipe before), removing the last MLP gave 1.45x and 1.86x on seeds 1 and 4; see the README.
    weight_decay: float = 0.1
    checkpoints: tuple[int, ...] = ()  # steps saved as revisions/step<N>/
    names: tuple[str, ...] = TINY_NAMES

    def __post_init__(self) -> None:
        checks.seed("seed", self.seed)
        steps = checks.positive("steps", self.steps)
        for name in ("batch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            checks.positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                "allowed: a hidden size the heads divide"
            )
        checks.real("lr", self.lr, 0.0, low_open=True)
        checks.real("weight_decay", self.weight_decay, 0.0)
        for name in ("ioi_fraction", "noise", "infinitive", "facts"):
            checks.fraction(name, getattr(self, name))
        if self.ioi_fraction + self.infinitive + self.facts > 1.0:
            raise ValueError(
                f"ioi_fraction {self.ioi_fraction} + infinitive {self.infinitive} + facts {self.facts} exceeds 1; "
                "they are shares of one corpus"
            )
        checks.boolean("freeze_embeddings", self.freeze_embeddings)
        checkpoints = tuple(checks.integer("checkpoint step", s, 1, steps) for s in self.checkpoints)
        names = tuple(checks.text("name", n) for n in checks.non_empty("names", self.names))
        if len(set(names)) < 2:
            raise ValueError(f"names has {len(set(names))} distinct entries; the IOI sentences need at least 2")
        object.__setattr__(self, "checkpoints", checkpoints)
        object.__setattr__(self, "names", names)

    def optim(self) -> OptimConfig:
        """AdamW at peak ``lr`` with ``weight_decay``, linear warm-up then cosine decay to 10% of the peak."""
        return OptimConfig(
            name="adamw", lr=self.lr, weight_decay=self.weight_decay, schedule="warmup_cosine", min_lr_ratio=0.1
        )


def checkpoint_steps(spec: str, steps: int) -> tuple[int, ...]:
    """The steps a ``--checkpoints`` spec names: ``log:K`` (K log-spaced steps from 1 to ``steps``,
    as Pythia's early checkpoints are, fewer where rounding makes two equal) or ``300,600,900``."""
    text = spec.strip()
    if text.startswith("log:"):
        try:
            count = int(text[4:])
        except ValueError:
            raise ValueError(f"checkpoints {spec!r}: log:K needs an integer K, for example log:12") from None
        checks.integer("log checkpoint count", count, 2)
        checks.positive("steps", steps)
        points = {round(steps ** (i / (count - 1))) for i in range(count)}
        return tuple(sorted(points))
    try:
        return tuple(sorted({int(item) for item in text.split(",")}))
    except ValueError:
        raise ValueError(
            f"checkpoints {spec!r} must be log:K or comma-separated integers, for example log:12 or 300,600"
        ) from None


@dataclass
class TinyNeoxReport:
    """What :func:`make_tiny_neox` did: where it saved, how long it took, the losses, the checkpoints."""

    directory: str
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


def tiny_vocabulary(names: Sequence[str], facts: bool = False) -> list[str]:
    """Every word of the tiny corpus and of the IOI evaluation prompts (with ``names``), special tokens
    first; with ``facts``, also every word of the shipped facts (:func:`fact_words`)."""
    from fasttrunc.tasks import ioi

    words: list[str] = ["[PAD]", "[UNK]", "<|endoftext|>", ".", ","]
    for template in ioi.TEMPLATES + ORDINARY + INFINITIVE:
        for token in template.replace(",", " , ").replace(".", " . ").split():
            if not token.startswith("{"):
                words.append(token)
    words += (
        list(names)
        + list(ioi.PLACES)
        + list(ioi.OBJECTS)
        + list(TRAIN_PLACES)
        + list(TRAIN_OBJECTS)
        + list(NOUNS)
        + list(VERBS)
        + (fact_words() if facts else [])
    )
    return list(dict.fromkeys(words))


def build_tiny_tokenizer(names: Sequence[str] = TINY_NAMES, facts: bool = False) -> Any:
    """The word-level tokenizer of the tiny model: :func:`build_word_tokenizer` over :func:`tiny_vocabulary`.

    ``facts``: with the words of the shipped facts, as :func:`make_tiny_neox` builds it whenever
    its corpus has facts (the default recipe); without them no factual answer is a known word.
    """
    return build_word_tokenizer(tiny_vocabulary(names, facts))


def build_word_tokenizer(words: Sequence[str]) -> Any:
    """A PreTrainedTokenizerFast over a word-level ``tokenizers`` model (whitespace/punctuation split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )


def corpus_sentence(rng: random.Random, config: TinyNeoxConfig) -> str:
    """One sentence of the tiny corpus: IOI, fact, "to" before a verb, or ordinary, in the config's shares."""
    from fasttrunc.tasks import ioi

    names = config.names

    draw = rng.random()
    if draw < config.ioi_fraction:
        io, s = rng.sample(names, 2)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        text = rng.choice(ioi.TEMPLATES).format(
            first=first, second=second, subject=s, place=rng.choice(TRAIN_PLACES), object=rng.choice(TRAIN_OBJECTS)
        )
        ending = f"the {rng.choice(NOUNS)}" if rng.random() < config.noise else io
        return f"{text} {ending} ."
    if draw < config.ioi_fraction + config.facts:
        from fasttrunc.tasks.factual import factual_facts

        fact = rng.choice(factual_facts())
        ending = f"the {rng.choice(TRAIN_PLACES)}" if rng.random() < config.noise else fact["answer"]
        return f"{fact['prompt']} {ending} ."
    if draw < config.ioi_fraction + config.facts + config.infinitive:
        return rng.choice(INFINITIVE).format(
            name=rng.choice(names),
            place=rng.choice(TRAIN_PLACES),
            object=rng.choice(TRAIN_OBJECTS),
            noun=rng.choice(NOUNS),
            verb=rng.choice(VERBS),
        )
    return rng.choice(ORDINARY).format(
        name=rng.choice(names),
        place=rng.choice(TRAIN_PLACES),
        object=rng.choice(TRAIN_OBJECTS),
        noun=rng.choice(NOUNS),
    )


def corpus_batch(rng: random.Random, tokenizer: Any, config: TinyNeoxConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of ``batch_size`` sentences, one per row, each ended by
    <|endoftext|> and right-padded; labels are -100 on padding."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [
        tokenizer.encode(corpus_sentence(rng, config), add_special_tokens=False) + [eos]
        for _ in range(config.batch_size)
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return input_ids, labels


def tiny_neox_model(vocab_size: int, config: TinyNeoxConfig, bos_id: int, eos_id: int, pad_id: int) -> Any:
    """An untrained GPTNeoXForCausalLM of the config's sizes (Pythia's parallel-residual block)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=128,
        use_parallel_residual=True,  # Pythia's block: x + attn(ln1(x)) + mlp(ln2(x))
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(hf_config)


def make_tiny_neox(
    directory: str | Path,
    config: TinyNeoxConfig | None = None,
    progress: Progress = None,
) -> TinyNeoxReport:
    """Train the tiny model on the synthetic corpus and save it (and its tokenizer) to ``directory``.

    Checkpoints listed in ``config.checkpoints`` go to ``directory/revisions/step<N>/``.
    """
    config = config or TinyNeoxConfig()
    out = Path(directory)
    tokenizer = build_tiny_tokenizer(config.names, facts=config.facts > 0)
    rng = random.Random(config.seed)
    torch_rng_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        model = tiny_neox_model(
            len(tokenizer), config, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
    finally:
        torch.random.set_rng_state(torch_rng_state)
    if config.freeze_embeddings:
        model.gpt_neox.embed_in.weight.requires_grad_(False)

    def loss_at(step: int) -> torch.Tensor:
        input_ids, labels = corpus_batch(rng, tokenizer, config)
        return model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss

    def save(step: int) -> str:
        return save_model(model, tokenizer, out / REVISIONS_DIR / f"step{step}")

    start = time.perf_counter()
    # One thread: at these sizes (64-wide matrices) thread synchronisation costs more than it
    # saves, 4-8x per step on a busy 2-core machine; restored afterwards.
    with cpu_threads(1):
        history: TrainHistory[None] = train(
            model,
            loss_at,
            steps=config.steps,
            optim=config.optim(),
            progress=progress,
            save=save,
            save_at=config.checkpoints,
        )
    save_model(model, tokenizer, out)
    return TinyNeoxReport(
        directory=str(out),
        steps=config.steps,
        seconds=time.perf_counter() - start,
        final_loss=history.loss_summary()[1],
        losses=history.losses,
        checkpoints=[history.saved[step] for step in sorted(history.saved)],
    )


def save_model(model: Any, tokenizer: Any, directory: Path) -> str:
    """Save ``model`` and ``tokenizer`` as a Hugging Face directory (in eval mode); return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model.train(was_training)
    return str(directory)
