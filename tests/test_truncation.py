"""truncate_ / Targets / Truncation.restore / save and load, on toy modules and a tiny GPT-NeoX."""

import json
import re

import pytest
import torch
from torch import nn

import fasttrunc
from fasttrunc import Targets, TruncatedLinear, load_truncated, resolve_targets, save_truncated, truncate_


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


def tiny_neox(seed=0, layers=4):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=80,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPTNeoXForCausalLM(config).eval()


def state_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.wk, self.attn.wv, self.attn.wo = (nn.Linear(8, 8, bias=False) for _ in range(3))
        self.ff = nn.Module()
        self.ff.w1, self.ff.w2 = nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 5)


def test_targets_resolve_through_the_family_table():
    model = tiny_neox()
    names = resolve_targets(model, Targets(layers=[-1, 1], matrices="mlp"))
    assert names == [
        "gpt_neox.layers.3.mlp.dense_h_to_4h",
        "gpt_neox.layers.3.mlp.dense_4h_to_h",
        "gpt_neox.layers.1.mlp.dense_h_to_4h",
        "gpt_neox.layers.1.mlp.dense_4h_to_h",
    ]
    assert resolve_targets(model, Targets(layers=0, matrices="attn_qkv")) == [
        "gpt_neox.layers.0.attention.query_key_value"
    ]
    assert len(resolve_targets(model, Targets())) == 16
    toy = Toy()
    assert resolve_targets(toy, Targets(layers=1, matrices=["attn_qkv", "mlp_out"])) == [
        "blocks.1.attn.wk",
        "blocks.1.attn.wv",
        "blocks.1.ff.w2",
    ]


def test_regex_targets_full_match():
    model = tiny_neox()
    assert resolve_targets(model, r"gpt_neox\.layers\.[12]\.mlp\.dense_4h_to_h") == [
        "gpt_neox.layers.1.mlp.dense_4h_to_h",
        "gpt_neox.layers.2.mlp.dense_4h_to_h",
    ]
    # full match: "dense" alone matches nothing, a partial name is not enough
    with pytest.raises(ValueError, match="match no nn.Linear; linears that exist: gpt_neox.layers.0"):
        resolve_targets(model, "dense")
    assert resolve_targets(model, ["lm_head", r".*\.0\.attention\.dense"]) == [
        "gpt_neox.layers.0.attention.dense",
        "lm_head",
    ]


@pytest.mark.parametrize(
    "targets, match",
    [
        (Targets(layers=4), r"layer 4 is out of range for a model with 4 layers; allowed: 0\.\.3 or -4\.\.-1"),
        (Targets(layers=-5), "layer -5 is out of range"),
        (Targets(layers=[]), "layers is empty"),
        (
            Targets(matrices="ffn"),
            "matrix 'ffn' is not known; allowed: mlp_in, mlp_out, attn_qkv, attn_out, mlp, attn, all",
        ),
        ("[unclosed", "regex '\\[unclosed' is invalid"),
        (3, "must be a regex"),
    ],
)
def test_bad_targets(targets, match):
    model = tiny_neox()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=match):
        truncate_(model, targets, 0.5)
    after = state_snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="matches no known model family"):
        resolve_targets(nn.Sequential(nn.Linear(2, 2)), Targets(layers=0))


def test_bad_rank_leaves_model_unchanged():
    model = tiny_neox()
    x = torch.randint(1, 96, (2, 7))
    before = model(x).logits
    # 40 fits no 32-wide matrix: the check fails before any module is swapped
    with pytest.raises(ValueError, match="rank 40 exceeds the maximum rank 32"):
        truncate_(model, Targets(matrices="all"), 40)
    with pytest.raises(ValueError, match="not a fraction"):
        truncate_(model, Targets(), 1.5)
    with pytest.raises(ValueError, match="method"):
        truncate_(model, Targets(), 0.5, method="svd")
    assert not any(isinstance(m, TruncatedLinear) for m in model.modules())
    assert torch.equal(model(x).logits, before)


def test_full_rank_swap_restore_and_generate():
    model = tiny_neox()
    prompt = torch.randint(1, 96, (1, 6))
    mask = torch.ones_like(prompt)
    x = torch.randint(1, 96, (3, 9))
    reference = model(x).logits
    tokens = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    truncation = truncate_(model, Targets(matrices="all"), 1.0)
    assert len(truncation) == 16 and all(isinstance(m, TruncatedLinear) for m in truncation.values())
    assert isinstance(model.gpt_neox.layers[2].mlp.dense_4h_to_h, TruncatedLinear)
    torch.testing.assert_close(model(x).logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False), tokens)
    truncation.restore()
    assert truncation.restored
    assert not any(isinstance(m, TruncatedLinear) for m in model.modules())
    assert torch.equal(model(x).logits, reference)  # bit-identical after restore
    truncation.restore()  # a second restore does nothing


def test_low_rank_changes_outputs_and_context_manager_restores():
    model = tiny_neox()
    x = torch.randint(1, 96, (2, 8))
    reference = model(x).logits
    with truncate_(model, Targets(layers=-1, matrices="mlp_out"), 2) as truncation:
        assert truncation.spec() == {"gpt_neox.layers.3.mlp.dense_4h_to_h": {"rank": 2, "method": "exact"}}
        assert not torch.allclose(model(x).logits, reference)
    assert torch.equal(model(x).logits, reference)


def test_truncating_twice_says_restore_first():
    model = tiny_neox()
    truncate_(model, Targets(layers=0, matrices="mlp_in"), 4)
    with pytest.raises(ValueError, match="already truncated"):
        truncate_(model, Targets(layers=0, matrices="mlp_in"), 2)
    with pytest.raises(ValueError, match="already truncated"):
        truncate_(model, r"gpt_neox\.layers\.0\.mlp\.dense_h_to_4h", 2)


def test_restore_refuses_when_module_was_replaced_again():
    model = tiny_neox()
    truncation = truncate_(model, Targets(layers=0, matrices="mlp_in"), 4)
    model.gpt_neox.layers[0].mlp.dense_h_to_4h = nn.Linear(32, 80)
    with pytest.raises(RuntimeError, match="replaced again"):
        truncation.restore()


def test_randomized_uses_one_batched_call_per_shape(monkeypatch):
    import fasttrunc.kernels.svd as svd_module  # on the torch path, one call per stacked shape group

    calls = []
    real = svd_module.randomized_svd

    def counting(w, *args, **kwargs):
        calls.append(tuple(w.shape))
        return real(w, *args, **kwargs)

    monkeypatch.setattr(svd_module, "randomized_svd", counting)
    model = tiny_neox()
    truncate_(model, Targets(matrices="mlp"), 0.25, method="randomized", generator=torch.Generator().manual_seed(0))
    assert sorted(calls) == sorted([(4, 80, 32), (4, 32, 80)])


def test_save_and_load_round_trip(tmp_path):
    model = tiny_neox(seed=1)
    truncate_(model, Targets(layers=[1, 3], matrices="mlp"), 0.25)
    truncate_(model, "lm_head", 5, method="randomized")
    x = torch.randint(1, 96, (2, 10))
    expected = model(x).logits
    save_truncated(model, tmp_path / "saved")
    spec = json.loads((tmp_path / "saved" / "truncation.json").read_text())
    assert spec["modules"]["lm_head"] == {
        "rank": 5,
        "method": "randomized",
        "in_features": 32,
        "out_features": 96,
        "bias": False,
    }
    fresh = tiny_neox(seed=2)  # different random weights: everything must come from the files
    truncation = load_truncated(fresh, tmp_path / "saved")
    assert set(truncation) == set(spec["modules"])
    assert fresh.lm_head.method == "randomized"
    assert torch.equal(fresh(x).logits, expected)


def test_load_rejects_mismatched_models(tmp_path):
    model = tiny_neox(layers=4)
    truncate_(model, Targets(layers=3, matrices="mlp_in"), 3)
    save_truncated(model, tmp_path)
    with pytest.raises(
        ValueError, match=re.escape("saved module 'gpt_neox.layers.3.mlp.dense_h_to_4h' does not exist")
    ):
        load_truncated(tiny_neox(layers=2), tmp_path)
    with pytest.raises(FileNotFoundError, match="truncation.json"):
        load_truncated(tiny_neox(), tmp_path / "nowhere")


def test_toy_family_and_training_through_truncated_layers():
    toy = Toy()
    truncation = truncate_(toy, Targets(layers=-1, matrices="mlp"), 0.5)
    assert set(truncation) == {"blocks.1.ff.w1", "blocks.1.ff.w2"}
    layer = toy.blocks[1].ff.w1
    x = torch.randn(4, 8)
    toy.blocks[1].ff.w2(torch.relu(layer(x))).sum().backward()
    assert layer.a.grad is not None


def test_public_api_is_importable_without_transformers():
    import subprocess
    import sys

    code = "import sys, fasttrunc; print('transformers' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    assert set(fasttrunc.__all__) >= {"TruncatedLinear", "truncate_", "Targets", "truncated_svd", "lowrank_linear"}
