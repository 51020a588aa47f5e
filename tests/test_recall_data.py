"""The recall data generator and the toy model: statistics, shapes, family-table selection."""

import pytest
import torch

from fasttrunc import Targets, TruncatedLinear, resolve_targets, truncate_
from fasttrunc.models.toy import ToyTransformer
from fasttrunc.tasks.recall import TRIGGER, make_chain, sample_batch


@pytest.fixture(scope="module")
def chain():
    return make_chain(32, seed=0)


def _after_trigger(batch):
    """Tokens that follow a trigger anywhere in the drawn sequences, with their sequence's answer."""
    tokens = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    prev, nxt = tokens[:, :-1], tokens[:, 1:]
    where = prev == TRIGGER
    answers = batch.answers[:, None].expand_as(prev)
    return nxt[where], answers[where]


def test_chain_is_a_distribution_with_the_trigger_most_frequent(chain):
    assert chain.vocab_size == 33 and chain.noise_token == 32 and chain.trigger == TRIGGER
    assert torch.allclose(chain.bigram.sum(dim=1), torch.ones(33), atol=1e-5)
    assert chain.unigram.argmax().item() == TRIGGER
    assert chain.bigram.shape == (33, 33)
    assert chain.bigram[:, 32].abs().max() == 0 and chain.unigram[32] == 0  # nothing draws the noise token
    assert chain.answers.tolist() == list(range(1, 32))  # ybar: ordinary tokens but the trigger


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_noise_rate_at_triggers_is_alpha(chain, alpha):
    batch = sample_batch(chain, 256, 64, alpha, torch.Generator().manual_seed(1))
    nxt, answers = _after_trigger(batch)
    assert nxt.numel() > 1000
    noisy = (nxt == chain.noise_token).float().mean().item()
    # Binomial standard error at n > 1000 is below 0.016; 4 of them.
    assert abs(noisy - alpha) < 0.065
    clean = nxt != chain.noise_token
    assert torch.equal(nxt[clean], answers[clean])  # never anything but ybar or noise after q


def test_answer_is_constant_within_a_sequence_and_never_the_trigger(chain):
    batch = sample_batch(chain, 128, 64, 0.0, torch.Generator().manual_seed(2))
    assert ((batch.answers >= 1) & (batch.answers < chain.noise_token)).all()
    for b in range(batch.inputs.shape[0]):
        tokens = torch.cat([batch.inputs[b], batch.targets[b, -1:]])
        after = tokens[1:][tokens[:-1] == TRIGGER]
        assert (after == batch.answers[b]).all()
    assert len(set(batch.answers.tolist())) > 10  # drawn per sequence, not fixed
    assert (batch.inputs != chain.noise_token).all()  # clean data holds no noise token


def test_mask_marks_triggers_with_an_earlier_trigger(chain):
    batch = sample_batch(chain, 64, 64, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    for b in range(8):
        seen = False
        for t in range(64):
            is_q = batch.inputs[b, t].item() == TRIGGER
            assert batch.mask[b, t].item() == (is_q and seen)
            seen = seen or is_q


def test_generator_is_seeded(chain):
    a = sample_batch(chain, 8, 32, 0.5, torch.Generator().manual_seed(7))
    b = sample_batch(chain, 8, 32, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.answers, b.answers)
    assert torch.equal(make_chain(32, seed=5).bigram, make_chain(32, seed=5).bigram)
    assert not torch.equal(make_chain(32, seed=5).bigram, make_chain(32, seed=6).bigram)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_alpha_is_rejected(chain, bad):
    with pytest.raises(ValueError, match="alpha"):
        sample_batch(chain, 4, 16, bad, torch.Generator())


def test_model_shapes_and_frozen_embeddings():
    model = ToyTransformer(vocab_size=33, d_model=16, d_ff=64, max_len=24)
    tokens = torch.randint(0, 33, (3, 24))
    capture = {}
    assert model(tokens, capture).shape == (3, 24, 33)
    assert capture["blocks.1.attn"].shape == (3, 24, 24)
    assert torch.allclose(capture["blocks.1.attn"].sum(-1), torch.ones(3, 24))
    assert torch.equal(capture["blocks.0.attn"].triu(1), torch.zeros(3, 24, 24))  # causal
    keep = torch.zeros(3, 24, dtype=torch.bool)
    keep[0, 5] = keep[2, 20] = True
    assert torch.allclose(model(tokens, keep=keep), model(tokens)[keep], atol=1e-5)
    trainable = {name for name, p in model.named_parameters()}
    assert trainable == {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.wk", "attn.wv", "attn.wo", "ff.w1", "ff.w2")
    }
    assert {"embed", "pos", "unembed"} <= set(model.state_dict())
    assert model.blocks[0].ff.w1.weight.shape == (64, 16) and model.blocks[0].ff.w2.weight.shape == (16, 64)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_family_table_selects_the_toy_matrices(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")
    model = ToyTransformer(vocab_size=33, d_model=16, d_ff=64, max_len=24)
    assert resolve_targets(model, Targets(layers=1, matrices="mlp_out")) == ["blocks.1.ff.w2"]
    assert resolve_targets(model, Targets(layers=-1, matrices="mlp")) == ["blocks.1.ff.w1", "blocks.1.ff.w2"]
    assert resolve_targets(model, Targets(layers=0, matrices="attn")) == [
        "blocks.0.attn.wk",
        "blocks.0.attn.wv",
        "blocks.0.attn.wo",
    ]
    tokens = torch.randint(0, 33, (2, 24))
    before = model(tokens)
    capture = {}
    with truncate_(model, Targets(layers=1, matrices="mlp_out"), rank=0) as t:
        assert isinstance(model.blocks[1].ff.w2, TruncatedLinear) and t["blocks.1.ff.w2"].rank == 0
        removed = model(tokens, capture)
    # Rank 0 on W2 (no bias) removes FF2: the output is the residual stream that enters it.
    assert torch.allclose(removed, model.logits_of(capture["blocks.1.ff_in"]), atol=1e-5)
    assert torch.equal(model(tokens), before)  # restored bit for bit


def test_tokens_follow_the_chain(chain):
    batch = sample_batch(chain, 2000, 64, 0.0, torch.Generator().manual_seed(4))
    tokens = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    prev, nxt = tokens[:, :-1].flatten(), tokens[:, 1:].flatten()
    for state in (3, 7):  # ordinary tokens: their successors follow the bigram row
        sel = prev == state
        empirical = torch.bincount(nxt[sel], minlength=chain.vocab_size).double() / sel.sum()
        assert sel.sum() > 1000
        assert (empirical - chain.bigram[state].double()).abs().max() < 0.03
    first = torch.bincount(tokens[:, 0], minlength=chain.vocab_size).double() / tokens.shape[0]
    assert (first - chain.unigram.double()).abs().max() < 0.05
