"""GPT-NeoX / Pythia: loading (hub id or local directory) and a tiny offline model that is trained
here to show the paper's effect.

transformers is imported inside the functions, so ``import fasttrunc`` stays light.

Local directories may hold training checkpoints as ``DIR/revisions/<name>/`` (what
:func:`make_tiny_neox` writes); ``revision="<name>"`` then loads that subdirectory, the way a hub
id's ``revision="step1000"`` loads a Pythia training checkpoint, and ``"main"`` the directory itself.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fasttrunc.runs import Progress, cpu_threads

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REVISIONS_DIR = "revisions"


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).exists()


def resolve_source(model: str, revision: str | None) -> tuple[str, str | None, bool]:
    """``(where, hub_revision, is_local)`` for a hub id or a local directory plus a revision."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model {model!r} is empty; give a hub id (EleutherAI/pythia-1b) or a local directory")
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is None or revision == "main":  # "main": the hub's name for the latest weights
            return str(path), None, True
        sub = path / REVISIONS_DIR / revision
        if not sub.is_dir():
            found = sorted(p.name for p in (path / REVISIONS_DIR).glob("*") if p.is_dir())
            raise ValueError(
                f"revision {revision!r} is not in local model directory {model}; "
                f"available under {REVISIONS_DIR}/: {', '.join(found) if found else 'none'}"
            )
        return str(sub), None, True
    if _looks_like_path(model):
        raise ValueError(f"model directory {model} does not exist")
    return model, revision, False


def _hub_problem(repo_id: str, revision: str | None) -> str | None:
    """None when the hub answers for ``repo_id``; otherwise why not, in a few words."""
    from huggingface_hub import model_info

    try:
        # 10 s: a reachable hub answers in well under a second; an unreachable one fails at DNS.
        model_info(repo_id, revision=revision, timeout=10)
    except Exception as exc:  # offline mode, DNS, timeout, unknown repo or revision: all mean "not here"
        return type(exc).__name__
    return None


def load_model(model: str, revision: str | None = None, dtype: str = "float32", device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a hub id (with ``revision``) or a local directory, in eval mode.

    A hub id that cannot be fetched (no network, unknown id or revision) is a one-line ValueError
    that names it and suggests a local directory.
    """
    torch_dtype = parse_dtype(dtype)
    where, hub_revision, is_local = resolve_source(model, revision)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # One quick request first: when the hub cannot be reached, load from the local cache only
    # instead of letting every file request retry with backoff (~20 s each).
    hub_problem = None if is_local else _hub_problem(where, hub_revision)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # callers draw their own progress; restored below
    try:
        kwargs = {"revision": hub_revision, "local_files_only": hub_problem is not None}
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, ConnectionError) as exc:  # hub errors subclass OSError or ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ValueError(f"cannot load model from {where}: {reason}") from None
        rev = f" at revision {hub_revision}" if hub_revision else ""
        raise ValueError(
            f"cannot fetch model {model!r}{rev} from the Hugging Face hub ({hub_problem or type(exc).__name__}); "
            f"download it where the hub is reachable and pass --model /path/to/local/dir"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    lm.to(device)
    lm.eval()
    return lm, tokenizer


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


@dataclass
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
    steps: int = 3000  # IOI accuracy (logit diff > 0) 0.91-0.98 on seeds 0-2; 2000 steps left two seeds at 0.57-0.80
    batch_size: int = 64  # sentences per step, one per row
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256  # 4 x hidden, as in Pythia
    lr: float = 4e-3  # AdamW peak, as in all runs of this corpus; 1e-3 learned IOI too slowly for the budget
    ioi_fraction: float = 0.3125  # share of IOI sentences; 0.35-0.45 left the last MLP at 1.0-2.3x
    noise: float = 0.5  # share of IOI sentences ending "to the <noun>" (the paper's alpha); 0.4 left seed 2 at 1.97x
    infinitive: float = 0.375  # share of INFINITIVE sentences ("to" before a verb); the rest are ORDINARY
    # Token embeddings stay at their random initialization, as in the paper's toy (PAPER.md 1a):
    # with trained ones (noise 0.4), removing the last MLP gave 3.8x on seed 1 but 1.4-1.7x on seed 2.
    freeze_embeddings: bool = True
    checkpoints: Sequence[int] = ()
    names: Sequence[str] = TINY_NAMES


@dataclass
class TinyNeoxReport:
    directory: str
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


def _vocabulary(names: Sequence[str]) -> list[str]:
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
    )
    return list(dict.fromkeys(words))


def build_word_tokenizer(words: Sequence[str]):
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


def _sentence(rng: random.Random, names: Sequence[str], config: TinyNeoxConfig) -> str:
    from fasttrunc.tasks import ioi

    draw = rng.random()
    if draw < config.ioi_fraction:
        io, s = rng.sample(list(names), 2)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        text = rng.choice(ioi.TEMPLATES).format(
            first=first, second=second, subject=s, place=rng.choice(TRAIN_PLACES), object=rng.choice(TRAIN_OBJECTS)
        )
        ending = f"the {rng.choice(NOUNS)}" if rng.random() < config.noise else io
        return f"{text} {ending} ."
    if draw < config.ioi_fraction + config.infinitive:
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


def corpus_batch(
    rng: random.Random, tokenizer, names: Sequence[str], config: TinyNeoxConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of ``batch_size`` sentences, one per row, each ended by
    <|endoftext|> and right-padded; labels are -100 on padding."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [
        tokenizer.encode(_sentence(rng, names, config), add_special_tokens=False) + [eos]
        for _ in range(config.batch_size)
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return input_ids, labels


def tiny_neox_model(vocab_size: int, config: TinyNeoxConfig, bos_id: int, eos_id: int, pad_id: int):
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
    names = list(config.names)
    if len(names) < 2:
        raise ValueError(f"names has {len(names)} entries; the IOI sentences need at least 2")
    for name in ("ioi_fraction", "noise", "infinitive"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} {value} is outside [0, 1]")
    if config.ioi_fraction + config.infinitive > 1.0:
        raise ValueError(
            f"ioi_fraction {config.ioi_fraction} + infinitive {config.infinitive} exceeds 1; they are shares of one corpus"
        )
    for step in config.checkpoints:
        if not 1 <= step <= config.steps:
            raise ValueError(f"checkpoint step {step} is outside 1..{config.steps}")
    tokenizer = build_word_tokenizer(_vocabulary(names))
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
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    # Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak rate.
    warmup = max(1, config.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, config.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses: list[float] = []
    saved: list[str] = []
    start = time.perf_counter()
    # One thread: at these sizes (64-wide matrices) thread synchronisation costs more than it
    # saves, 4-8x per step on a busy 2-core machine; restored afterwards.
    with cpu_threads(1):
        _train(model, tokenizer, names, config, rng, optimizer, scheduler, losses, saved, out, progress)
    _save(model, tokenizer, out)
    return TinyNeoxReport(
        directory=str(out),
        steps=config.steps,
        seconds=time.perf_counter() - start,
        final_loss=sum(losses[-20:]) / len(losses[-20:]),
        losses=losses,
        checkpoints=saved,
    )


def _train(model, tokenizer, names, config, rng, optimizer, scheduler, losses, saved, out, progress) -> None:
    for step in range(1, config.steps + 1):
        input_ids, labels = corpus_batch(rng, tokenizer, names, config)
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step in config.checkpoints:
            target = out / REVISIONS_DIR / f"step{step}"
            _save(model, tokenizer, target)
            saved.append(str(target))
        if progress is not None:
            progress("training", step, config.steps, f"loss {losses[-1]:.3f}")


def _save(model, tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model.train(was_training)
