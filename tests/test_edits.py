"""Edit kinds against explicit tensor math, bit-exact restores, and edits.json."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from fasttrunc.edits import Edit, apply_edit, apply_edits, load_edits, save_edits
from fasttrunc.truncation import factorize


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def tiny(conv1d: bool = False) -> nn.Module:
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        return nn.Sequential(Conv1D(9, 6), nn.ReLU(), Conv1D(7, 9))  # Conv1D(nf=out, nx=in)
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7))


def weight_of(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w if isinstance(module, nn.Linear) else w.t()


def svd_top(w: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).float()


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("kind", ["keep-top", "remove-top", "magnitude"])
def test_each_kind_against_tensor_math_and_restores_bit_exactly(kind, conv1d):
    model = tiny(conv1d)
    x = torch.randn(4, 6)
    before_out, before_hash = model(x), state_hash(model)
    w0 = weight_of(model[0]).clone()
    k = 2
    with apply_edit(model, "0", kind, k) as edit:
        w = edit["0"].weight.detach()
        w = w if kind == "keep-top" or not conv1d else w.t()
        if kind == "keep-top":
            torch.testing.assert_close(w, svd_top(w0, k), atol=1e-5, rtol=0)
        elif kind == "remove-top":
            torch.testing.assert_close(w, w0 - svd_top(w0, k), atol=1e-5, rtol=0)
        else:
            keep = k * (6 + 9)
            assert int((w != 0).sum()) == keep
            threshold = w0.abs().flatten().sort(descending=True).values[keep - 1]
            assert bool((w0.abs()[w != 0] >= threshold).all())
            torch.testing.assert_close(w[w != 0], w0[w != 0], atol=0, rtol=0)
        expected = torch.relu(x @ w.T + model[0].bias.detach())
        torch.testing.assert_close(model[1](model[0](x)), expected, atol=1e-5, rtol=1e-5)
        assert not torch.equal(model(x), before_out)
        torch.testing.assert_close(weight_of(edit.originals["0"]), w0, atol=0, rtol=0)  # never mutated
    assert state_hash(model) == before_hash
    assert torch.equal(model(x), before_out)


def test_rho_and_precomputed_factors():
    model = tiny()
    factors = factorize(model, "0|2", 5)
    w0 = weight_of(model[0]).clone()
    with apply_edit(model, "0", "remove-top", 0.5, factors=factors) as edit:  # rho 0.5 of min(9, 6) = 3
        torch.testing.assert_close(edit["0"].weight.detach(), w0 - svd_top(w0, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="fewer than 6 components"):
        apply_edit(model, "0", "remove-top", 6, factors=factors)
    with pytest.raises(ValueError, match="kind 'bottom' is not known"):
        apply_edit(model, "0", "bottom", 1)


def test_magnitude_keeps_everything_when_the_budget_exceeds_the_matrix():
    model = tiny()
    with apply_edit(model, "2", "magnitude", 7) as edit:  # 7 * (9 + 7) > 63 entries
        assert torch.equal(edit["2"].weight, model.get_submodule("2").weight)


def test_apply_edits_mixes_kinds_and_restores():
    model = tiny()
    before = state_hash(model)
    edits = [Edit("0", 2, "magnitude"), Edit("2", 3)]
    truncation = apply_edits(model, edits)
    assert set(truncation) == {"0", "2"}
    assert type(model[2]).__name__ == "TruncatedLinear" and model[2].rank == 3
    assert isinstance(model[0], nn.Linear) and int((model[0].weight != 0).sum()) == 2 * 15
    truncation.restore()
    assert state_hash(model) == before
    with pytest.raises(ValueError, match="edited twice"):
        apply_edits(model, [Edit("0", 1), Edit("0", 2, "remove-top")])
    with pytest.raises(ValueError, match="module 1 is a ReLU"):
        apply_edits(model, [Edit("0", 1, "magnitude"), Edit("1", 1, "remove-top")])
    with pytest.raises(ValueError, match="no module 5"):
        apply_edits(model, [Edit("5", 1)])
    with pytest.raises(ValueError, match="rank 8 exceeds"):
        apply_edits(model, [Edit("0", 1, "magnitude"), Edit("2", 8, "remove-top")])
    assert state_hash(model) == before and isinstance(model[0], nn.Linear)  # the failed call undid its first part


def test_edits_file_round_trip_and_errors(tmp_path):
    edits = [
        Edit("gpt_neox.layers.1.mlp.dense_4h_to_h", 0.01),
        Edit("gpt_neox.layers.0.mlp.dense_h_to_4h", 3, "remove-top"),
    ]
    path = save_edits(tmp_path / "edits.json", edits, scores=[1.0, 2.0])
    assert load_edits(path) == edits
    assert json.loads(path.read_text())["scores"] == [1.0, 2.0]
    cases = {
        "{": "not valid JSON",
        '{"edit": []}': 'expected {"edits"',
        '{"edits": [{"module": "a"}]}': "edit 0 has no rank",
        '{"edits": [{"module": "a", "rank": 1, "why": 2}]}': r"edit 0 has unknown keys \['why'\]",
        '{"edits": [{"module": "a", "rank": -1}]}': "edit 0: rank -1 is negative",
        '{"edits": [{"module": "a", "rank": 1, "kind": "x"}]}': "edit 0: kind 'x' is not known",
        '{"edits": [{"module": "a", "rank": 1}, {"module": "a", "rank": 2}]}': "module a is edited twice",
    }
    for text, message in cases.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_edits(tmp_path / "bad.json")


def test_target_edits_and_their_spec():
    from fasttrunc.edits import edit_spec, target_edits

    model = tiny(conv1d=True)
    edits = target_edits(model, ["0", "2"], 0.5, "remove-top")
    assert edits == [Edit("0", 0.5, "remove-top"), Edit("2", 0.5, "remove-top")]
    with apply_edits(model, edits) as truncation:
        spec = edit_spec(truncation, edits, "exact")
    # int(0.5 * min(out, in)): Conv1D(9, 6) is 9 x 6 -> 3, Conv1D(7, 9) is 7 x 9 -> 3
    assert spec == {name: {"rank": 3, "kind": "remove-top", "method": "exact"} for name in ("0", "2")}
    with apply_edits(model, [Edit("2", 4, "magnitude")]) as truncation:
        assert edit_spec(truncation, [Edit("2", 4, "magnitude")])["2"] == {
            "rank": 4,
            "kind": "magnitude",
            "method": None,
        }
    with pytest.raises(ValueError, match="kind 'zero' is not known"):
        target_edits(model, ["0"], 1, "zero")
    with pytest.raises(ValueError, match="rank 1.5"):
        target_edits(model, ["0"], 1.5)
