"""factorize once, truncate many; rank mappings; callable targets; merge_; module kinds."""

import numpy as np
import pytest
import torch
from test_truncation import tiny_neox as neox_of_test_truncation
from torch import nn

import fasttrunc
from fasttrunc import Targets, TruncatedLinear, factorize, resolve_targets, truncate_
from fasttrunc.families import CONV1D, LINEAR, expand_matrices, module_kind


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


def tiny_neox(seed=0, layers=3):
    return neox_of_test_truncation(seed=seed, layers=layers)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sliced_factors_equal_a_fresh_truncation():
    model = tiny_neox()
    x = torch.randint(1, 64, (2, 9))
    targets = Targets(layers=[0, -1], matrices="mlp")
    factors = factorize(model, targets, 16)
    assert len(factors) == 4 and factors.method == "exact"
    assert factors.svd_calls == 2  # two shapes (80x32, 32x80), one batched SVD each
    assert all(s.dtype == torch.float32 and s.shape[-1] == 16 for _, s, _ in factors.values())
    for rank in (16, 7, 0):
        with truncate_(model, targets, rank, factors=factors):
            sliced = model(x).logits
        with truncate_(model, targets, rank):
            fresh = model(x).logits
        torch.testing.assert_close(sliced, fresh, rtol=1e-6, atol=1e-6)


def test_rank_mapping_per_module():
    model = tiny_neox()
    names = resolve_targets(model, Targets(layers=1, matrices="mlp"))
    ranks = {names[0]: 3, names[1]: 0.25}
    with truncate_(model, Targets(layers=1, matrices="mlp"), ranks) as t:
        assert t[names[0]].rank == 3 and t[names[1]].rank == int(0.25 * 32)
    before = snapshot(model)
    with pytest.raises(ValueError, match="gives no rank for the selected modules"):
        truncate_(model, Targets(layers=1, matrices="mlp"), {names[0]: 3})
    with pytest.raises(ValueError, match="rank names modules that the targets do not select"):
        truncate_(model, Targets(layers=1, matrices="mlp_in"), ranks)
    assert same(before, snapshot(model))


def test_factors_checked_before_any_swap():
    model = tiny_neox()
    factors = factorize(model, Targets(layers=0, matrices="mlp_in"), 4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="exceeds the 4 components factorized"):
        truncate_(model, Targets(layers=0, matrices="mlp_in"), 5, factors=factors)
    with pytest.raises(ValueError, match="factors hold no SVD of gpt_neox.layers.0.mlp.dense_4h_to_h"):
        truncate_(model, Targets(layers=0, matrices="mlp"), 2, factors=factors)
    with pytest.raises(ValueError, match="computed with method 'exact', not 'randomized'"):
        truncate_(model, Targets(layers=0, matrices="mlp_in"), 2, method="randomized", factors=factors)
    with pytest.raises(TypeError, match="factors must come from fasttrunc.factorize"):
        truncate_(model, Targets(layers=0, matrices="mlp_in"), 2, factors={})
    assert same(before, snapshot(model))
    assert not any(isinstance(m, TruncatedLinear) for m in model.modules())


def test_callable_targets():
    model = tiny_neox()
    chosen = truncate_(model, lambda name, module: name.endswith("dense_4h_to_h"), 2)
    assert sorted(chosen) == [f"gpt_neox.layers.{i}.mlp.dense_4h_to_h" for i in range(3)]
    with pytest.raises(ValueError, match="already truncated"):
        truncate_(model, lambda name, module: "mlp" in name, 2)
    chosen.restore()
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        truncate_(model, lambda name, module: False, 2)


def test_regex_over_truncated_and_untruncated_modules_is_refused():
    model = tiny_neox()
    truncate_(model, Targets(layers=0, matrices="mlp_in"), 2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already truncated \(restore first\): gpt_neox.layers.0.mlp.dense_h_to_4h"):
        truncate_(model, r"gpt_neox\.layers\.\d\.mlp\.dense_h_to_4h", 2)
    assert same(before, snapshot(model))


def test_root_module_is_refused():
    linear = nn.Linear(6, 4)
    before = snapshot(linear)
    with pytest.raises(ValueError, match="root module itself cannot be truncated"):
        truncate_(linear, ".*", 0)
    assert same(before, snapshot(linear)) and "" not in dict(linear.named_children())


def test_frozen_layer_stays_frozen_and_restores_exactly():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    originals = list(model)
    with truncate_(model, ["0", "2"], 2) as t:
        assert not any(p.requires_grad for p in t["0"].parameters())
        assert all(p.requires_grad for p in t["2"].parameters())
    assert list(model) == originals and not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_targets_types_are_checked():
    assert Targets(layers=np.int64(1)).layers == 1
    assert Targets(layers=[np.int32(0), -1]).layers == [0, -1]
    with pytest.raises(ValueError, match="layer 1.0 is not an integer"):
        Targets(layers=1.0)
    with pytest.raises(ValueError, match="layer True is not an integer"):
        Targets(layers=True)
    with pytest.raises(ValueError, match="matrices None must be an alias"):
        Targets(matrices=None)


def test_aliases_of_a_fused_matrix_name_the_fused_alias():
    model = tiny_neox()
    with pytest.raises(ValueError, match="'attn_q' is part of a fused matrix in gpt-neox; .* 'attn_qkv'"):
        resolve_targets(model, Targets(layers=0, matrices="attn_q"))
    with pytest.raises(ValueError, match="'mlp_up' does not exist in gpt-neox; it has: mlp_in, mlp_out, attn_qkv"):
        resolve_targets(model, Targets(layers=0, matrices="mlp_up"))
    assert expand_matrices("all") == ["mlp_in", "mlp_up", "mlp_out", "attn_qkv", "attn_out"]


def test_merge_writes_dense_weights_into_the_original_modules():
    model = tiny_neox()
    x = torch.randint(1, 64, (2, 7))
    truncation = truncate_(model, Targets(layers=-1, matrices="mlp"), 3)
    expected = model(x).logits
    originals = dict(truncation.originals)
    merged = truncation.merge_()
    assert merged is model and not any(isinstance(m, TruncatedLinear) for m in model.modules())
    for name, module in originals.items():
        assert model.get_submodule(name) is module
        assert torch.linalg.matrix_rank(module.weight.double(), rtol=1e-4).item() == 3
    torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        truncation.merge_()
    with pytest.raises(ValueError, match="nothing to restore"):
        truncation.restore()
    restored = truncate_(model, Targets(layers=0, matrices="mlp_in"), 2)
    restored.restore()
    with pytest.raises(ValueError, match="was restored"):
        restored.merge_()


def test_conv1d_is_a_module_kind():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=10)  # weight stored (in, out) = (10, 6)
    assert module_kind(conv) is CONV1D and module_kind(nn.Linear(2, 2)) is LINEAR
    assert CONV1D.shape(conv) == (6, 10)
    x = torch.randn(3, 10)
    full = TruncatedLinear.from_linear(conv, 1.0)
    assert (full.out_features, full.in_features) == (6, 10)
    torch.testing.assert_close(full(x), conv(x), rtol=1e-5, atol=1e-5)
    model = nn.Sequential(conv)
    reference = model(x)
    with truncate_(model, "0", 2) as t:
        low = model(x)
        assert t["0"].rank == 2
        u, s, vh = fasttrunc.truncated_svd(conv.weight.detach().t(), 2)
        torch.testing.assert_close(low, x @ (u * s @ vh).t() + conv.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), reference)
    merged = truncate_(model, "0", 2)
    merged.merge_()
    torch.testing.assert_close(model(x), low, rtol=1e-5, atol=1e-5)
    assert model[0] is conv and conv.weight.shape == (10, 6)


def test_from_svd_checks_its_arguments():
    u, s, vh = torch.randn(6, 2), torch.rand(2), torch.randn(2, 5)
    layer = TruncatedLinear.from_svd(u, s, vh, bias=torch.zeros(6))
    assert layer.rank == 2 and layer.in_features == 5
    with pytest.raises(ValueError, match="do not agree on a rank"):
        TruncatedLinear.from_svd(u, s[:1], vh)
    with pytest.raises(ValueError, match="s has negative entries"):
        TruncatedLinear.from_svd(u, -s, vh)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\); expected \(6,\)"):
        TruncatedLinear.from_svd(u, s, vh, bias=torch.zeros(5))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        TruncatedLinear.from_svd(u.long(), s, vh)
    with pytest.raises(ValueError, match="method 'evil' is not known"):
        TruncatedLinear.from_svd(u, s, vh, method="evil")
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        TruncatedLinear.from_svd(np.zeros((6, 2)), s, vh)


@pytest.mark.parametrize(
    "args, match",
    [
        (("8", 6, 2), "in_features '8' is not an integer"),
        ((8.7, 6, 2), "in_features 8.7 is not an integer"),
        ((True, 6, 2), "in_features True is not an integer"),
        ((8, 0, 2), "out_features 0 is out of range"),
    ],
)
def test_constructor_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        TruncatedLinear(*args)


def test_constructor_rejects_integer_dtype():
    with pytest.raises(ValueError, match="dtype torch.int32 is not a floating-point dtype"):
        TruncatedLinear(8, 6, 2, dtype=torch.int32)
