"""Pythia's story along training, offline: log-spaced checkpoints of the tiny GPT-NeoX, facts in
its corpus, and `run pythia --revisions all` (cheap checks; the trained model lives in test_pythia)."""

from __future__ import annotations

import random

import pytest
from typer.testing import CliRunner

from fasttrunc.cli.main import app
from fasttrunc.experiments import pythia
from fasttrunc.models import tiny_neox
from fasttrunc.tasks.factual import build_factual_prompts, factual_facts


def test_log_checkpoints_are_log_spaced_and_end_at_the_last_step():
    steps = tiny_neox.checkpoint_steps("log:12", 5000)
    assert len(steps) == 12 and steps[0] == 1 and steps[-1] == 5000
    assert list(steps) == sorted(set(steps))
    ratios = [b / a for a, b in zip(steps[1:], steps[2:])]
    assert all(1.8 < r < 2.6 for r in ratios)  # 5000^(1/11) = 2.17, up to rounding
    assert tiny_neox.checkpoint_steps("log:3", 100) == (1, 10, 100)
    assert tiny_neox.checkpoint_steps("log:12", 5) == (1, 2, 3, 4, 5)  # rounding merges equal steps
    assert tiny_neox.checkpoint_steps("600, 300,900", 1000) == (300, 600, 900)


@pytest.mark.parametrize("spec, words", [("log:x", "log:K needs an integer"), ("log:1", "2"), ("3,a", "log:K or")])
def test_bad_checkpoint_specs(spec, words):
    with pytest.raises(ValueError, match=words):
        tiny_neox.checkpoint_steps(spec, 100)


def test_make_tiny_neox_cli_rejects_a_bad_spec(tmp_path):
    result = CliRunner().invoke(app, ["make-tiny-neox", str(tmp_path / "m"), "--checkpoints", "log:zz"])
    assert result.exit_code == 2 and "log:K" in result.output and "Traceback" not in result.output


def test_local_revisions_in_training_order(tmp_path):
    for name in ("step10", "step2", "step100", "step1", "final"):
        (tmp_path / "revisions" / name).mkdir(parents=True)
    assert pythia.local_revisions(str(tmp_path)) == ("step1", "step2", "step10", "step100", "final")
    assert pythia.resolve_revisions(str(tmp_path), ("all",))[-2:] == ("step100", "final")
    assert pythia.resolve_revisions(str(tmp_path), ("step2",)) == ("step2",)
    with pytest.raises(ValueError, match="stands alone"):
        pythia.resolve_revisions(str(tmp_path), ("all", "step2"))
    with pytest.raises(ValueError, match="holds no checkpoints"):
        pythia.local_revisions(str(tmp_path / "revisions" / "step1"))
    with pytest.raises(ValueError, match="needs a local model directory"):
        pythia.local_revisions("EleutherAI/pythia-1b")


def test_corpus_holds_the_facts_with_the_noise_share():
    config = tiny_neox.TinyNeoxConfig()
    rng = random.Random(1)
    sentences = [tiny_neox.corpus_sentence(rng, config) for _ in range(4000)]
    prompts = {f["prompt"]: f["answer"] for f in factual_facts()}
    facts = [s for s in sentences if any(s.startswith(p + " ") for p in prompts)]
    assert abs(len(facts) / len(sentences) - config.facts) < 0.025
    endings = {f"the {place} ." for place in tiny_neox.TRAIN_PLACES}
    noisy = [s for s in facts if any(s == f"{p} {e}" for p in prompts for e in endings)]
    assert abs(len(noisy) / len(facts) - config.noise) < 0.07
    clean = [s for s in facts if s not in noisy]
    assert all(any(s == f"{p} {a} ." for p, a in prompts.items()) for s in clean)
    # Every fact is one the factual task asks, with its answer a single word of the vocabulary.
    tokenizer = tiny_neox.build_tiny_tokenizer(facts=True)
    assert len(build_factual_prompts(tokenizer)) == len(factual_facts())
    unk = tokenizer.unk_token_id
    assert all(unk not in tokenizer.encode(s, add_special_tokens=False) for s in sentences)
