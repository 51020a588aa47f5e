"""The paper's settings of the recall toy: tiny-Shakespeare data, the unembedding init, the two
FF2 probes and the attention truncations (Wv, Wo and the product Wo Wv)."""

import json
import math
from importlib import resources

import pytest
import torch

from fasttrunc.experiments.recall import (
    GRID_MATRICES,
    PRESETS,
    RecallConfig,
    evaluate,
    run,
    truncate_value_output,
)
from fasttrunc.linear import TruncatedLinear
from fasttrunc.models.toy import ToyTransformer
from fasttrunc.tasks.recall import sample_batch, shakespeare_chain, shakespeare_counts

TINY = dict(steps=4, eval_sequences=16, track_sequences=8, d_model=16, d_ff=32, seq_len=24, batch_size=8)


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


@pytest.fixture(scope="module")
def chain():
    return shakespeare_chain()


# --- the data -------------------------------------------------------------------------------------


def test_shakespeare_tables_are_the_texts_counts():
    counts = shakespeare_counts()
    chars, unigram, bigram = counts["chars"], counts["unigram"], counts["bigram"]
    assert len(chars) == 65 and chars == "".join(sorted(set(chars)))
    assert sum(unigram) == 1115394  # the text's length, as the source says
    assert sum(map(sum, bigram)) == sum(unigram) - 1  # every consecutive pair once
    # Each character is followed as often as it occurs, except the text's last one (a newline).
    followed = [sum(row) for row in bigram]
    assert [u - f for u, f in zip(unigram, followed)] == [1 if c == "\n" else 0 for c in chars]
    assert "char-rnn" in counts["source"] and "public domain" in counts["licence"]
    raw = resources.files("fasttrunc").joinpath("data/tiny_shakespeare.json").read_bytes()
    assert json.loads(raw) == counts


def test_shakespeare_chain_is_the_papers(chain):
    assert chain.vocab_size == 65 and chain.bigram.shape == (65, 65)
    assert chain.tokens[chain.trigger] == " "  # the most frequent character
    assert chain.unigram.argmax().item() == chain.trigger
    assert chain.tokens[chain.noise] == "!" and chain.noise == 2  # the paper's noise_token_id
    assert chain.bigram[chain.noise].sum() == pytest.approx(1.0)  # an ordinary character with its own row
    assert chain.answers.tolist() == list(range(65))  # ybar over the whole vocabulary
    assert torch.allclose(chain.bigram.sum(dim=1), torch.ones(65), atol=1e-5)


def test_shakespeare_batches_plant_ybar_or_noise_after_the_space(chain):
    batch = sample_batch(chain, 512, 64, 0.5, torch.Generator().manual_seed(0))
    tokens = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    after = tokens[:, :-1] == chain.trigger
    nxt = tokens[:, 1:][after]
    answers = batch.answers[:, None].expand_as(after)[after]
    assert nxt.numel() > 2000
    noisy = nxt == chain.noise
    assert abs(noisy.float().mean().item() - 0.5) < 0.05 + (answers == chain.noise).float().mean().item()
    assert torch.equal(nxt[~noisy], answers[~noisy])
    # ybar takes every value, the trigger and the noise token included, about uniformly.
    drawn = torch.bincount(sample_batch(chain, 6500, 2, 0.0, torch.Generator().manual_seed(1)).answers, minlength=65)
    assert drawn.min() > 50 and drawn.max() < 150
    # The chain elsewhere: the character after "q" is "u" almost always in Shakespeare.
    q = chain.tokens.index("q")
    assert chain.bigram[q, chain.tokens.index("u")] > 0.9


# --- the unembedding init -------------------------------------------------------------------------


@pytest.mark.parametrize("init, std", [("paper", 1 / math.sqrt(3 * 256)), ("normal", 1 / math.sqrt(256))])
def test_unembedding_init(init, std):
    model = ToyTransformer(vocab_size=65, d_model=256, d_ff=8, max_len=4, unembed_init=init)
    w = model.unembed
    assert w.std().item() == pytest.approx(std, rel=0.03)
    if init == "paper":  # nn.Linear's default: uniform within +-1/sqrt(d)
        assert w.abs().max().item() <= 1 / 16
        assert w.abs().max().item() > 0.99 / 16
    else:
        assert w.abs().max().item() > 1 / 16
    with pytest.raises(ValueError, match="init 'xavier'"):
        ToyTransformer(vocab_size=5, d_model=4, d_ff=4, max_len=4, unembed_init="xavier")


def test_paper_preset_is_the_papers_data_and_init():
    for name in ("paper", "paper-small"):
        assert PRESETS[name]["data"] == "shakespeare" and PRESETS[name]["init"] == "paper"
    assert PRESETS["quick"]["data"] == "synthetic" and PRESETS["quick"]["init"] == "normal"


# --- the probes and the attention truncations ------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = ToyTransformer(vocab_size=65, d_model=16, d_ff=32, max_len=24, seed=3)
    for p in model.parameters():  # a non-trivial, untrained model
        p.data.normal_(0, 0.3)
    return model


def test_embedding_probe_is_ff2_on_the_triggers_token_embedding(chain, small_model):
    batch = sample_batch(chain, 16, 24, 0.0, torch.Generator().manual_seed(2))
    metrics = evaluate(small_model, batch, chain.noise, chain.trigger)
    with torch.no_grad():
        logits = small_model.logits_of(small_model.blocks[1].ff(small_model.embed[chain.trigger]))
    others = torch.cat([logits[: chain.noise], logits[chain.noise + 1 :]])
    assert metrics.ff2_probe_embedding == pytest.approx(float(logits[chain.noise] - others.max()), abs=1e-5)
    # The residual probe reads other inputs: the two are different numbers.
    assert metrics.ff2_probe_embedding != pytest.approx(metrics.ff2_probe_residual, abs=1e-3)


def test_product_truncation_is_the_low_rank_wo_wv_and_restores(small_model):
    tokens = torch.randint(0, 65, (2, 24), generator=torch.Generator().manual_seed(4))
    before = small_model(tokens)
    attn = small_model.blocks[1].attn
    wv, wo = attn.wv, attn.wo
    with truncate_value_output(small_model, 1, 1.0) as low:
        assert isinstance(low, TruncatedLinear) and low.rank == 16
        assert torch.allclose(small_model(tokens), before, atol=1e-4)  # full rank: the model itself
    with truncate_value_output(small_model, 1, 0.25) as low:
        assert low.rank == 4
        effective = low.to_linear().weight
        product = wo.weight @ wv.weight
        assert torch.linalg.matrix_rank(effective).item() == 4
        # Eckart-Young: the error is the norm of the dropped singular values.
        s = torch.linalg.svdvals(product)
        assert torch.linalg.norm(product - effective).item() == pytest.approx(s[4:].norm().item(), rel=1e-3)
        assert not torch.allclose(small_model(tokens), before, atol=1e-4)
    assert attn.wv is wv and attn.wo is wo
    assert torch.equal(small_model(tokens), before)  # restored bit for bit
    with pytest.raises(RuntimeError, match="inside"), truncate_value_output(small_model, 1, 0.0):
        raise RuntimeError("inside")
    assert attn.wv is wv and attn.wo is wo


def test_shakespeare_run_reports_every_cell_and_both_probes():
    result = run(RecallConfig(**TINY, data="shakespeare", init="paper"))
    assert "tiny-Shakespeare" in result.data and "' '" in result.data and "'!'" in result.data
    assert [c.matrix for c in result.cells] == [m for m in GRID_MATRICES for _ in result.config.rhos]
    data = result.to_dict()
    assert data["config"]["data"] == "shakespeare" and data["config"]["init"] == "paper"
    for cell in data["cells"]:
        assert {"ff2_probe_embedding", "ff2_probe_residual"} <= set(cell["metrics"])
    other = run(RecallConfig(**TINY, data="shakespeare", init="normal"))
    assert other.full != result.full  # the init changes the model
