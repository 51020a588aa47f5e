"""Edits on the command line: `run pythia --edits`, `export --edit KIND` / `--edits`, and merging dense edits.

An exported checkpoint is reloaded with plain transformers and must predict what the edited model
predicts; the models are tiny random GPT-NeoX directories built from configs (the hub is unreachable).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from test_cli_targets_export import one_line_error
from test_cli_user_tasks import CAPITALS, invoke, run_json, save_tiny_neox
from torch import nn

from fasttrunc.edits import Edit, apply_edit, apply_edits, save_edits

MLP_IN_0 = "gpt_neox.layers.0.mlp.dense_h_to_4h"
MLP_OUT_1 = "gpt_neox.layers.1.mlp.dense_4h_to_h"
QKV_1 = "gpt_neox.layers.1.attention.query_key_value"
COMPOSITION = [Edit(MLP_OUT_1, 0.25, "keep-top"), Edit(MLP_IN_0, 3, "remove-top"), Edit(QKV_1, 2, "magnitude")]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    return save_tiny_neox(tmp_path_factory.mktemp("tiny-neox-edits"), seed=7)


@pytest.fixture
def edits_file(tmp_path):
    return save_edits(tmp_path / "edits.json", COMPOSITION, note="a test composition")


IDS = torch.tensor([[510, 5347, 273, 6181, 310, 7785, 15, 187, 510, 5347]])


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def plain(directory) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


# --- merge_ of dense replacements ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["remove-top", "magnitude", "keep-top"])
def test_merge_writes_every_edit_kind_into_the_original_modules(kind):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7))
    originals = [model[0], model[2]]
    x = torch.randn(5, 6)
    with torch.no_grad():
        before = model(x)
        truncation = apply_edit(model, ["0", "2"], kind, 2)
        edited = model(x)
        merged = truncation.merge_()
        after = model(x)
    assert merged is model and model[0] is originals[0] and model[2] is originals[1]
    assert all(type(m) is nn.Linear for m in model.modules() if m is not model and not isinstance(m, nn.ReLU))
    torch.testing.assert_close(after, edited, rtol=1e-5, atol=1e-6)
    assert (after - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="already merged"):
        truncation.merge_()


def test_merge_refuses_a_foreign_replacement_and_writes_nothing():
    from fasttrunc.truncation import replace_modules_

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    dense = nn.Linear(4, 4)
    truncation = replace_modules_(model, {"0": dense, "1": nn.Identity()})
    with pytest.raises(ValueError, match="1: cannot merge a Identity into a Linear"):
        truncation.merge_()
    truncation.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, kept[key]), key  # module 0 was not written either
    wide = replace_modules_(model, {"0": nn.Linear(4, 5)})
    with pytest.raises(ValueError, match=r"0: the replacement's weight is \(5, 4\)"):
        wide.merge_()


# --- fasttrunc export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["remove-top", "magnitude"])
def test_export_of_a_dense_edit_reloads_and_predicts_what_the_edited_model_does(neox_dir, tmp_path, kind):
    out = tmp_path / kind
    result = invoke(
        ["export", "--model", neox_dir, "--layer", "1", "--matrix", "mlp", "--rank", "3", "--edit", kind]
        + ["--out", out, "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    method = None if kind == "magnitude" else "exact"
    names = ["gpt_neox.layers.1.mlp.dense_h_to_4h", MLP_OUT_1]
    assert summary["modules"] == {name: {"rank": 3, "kind": kind, "method": method} for name in names}
    assert summary["record"]["model"] == str(neox_dir) and summary["record"]["svd"]["method"] == "exact"
    assert summary["record"]["tokenizer"]["vocab_size"] > 50000
    exported = plain(out)
    assert {type(m).__name__ for m in exported.modules()} >= {"Linear"}
    assert not any(type(m).__module__.startswith("fasttrunc") for m in exported.modules())
    model = plain(neox_dir)
    original = logits_of(model)
    with apply_edit(model, names, kind, 3):
        edited = logits_of(model)
    torch.testing.assert_close(logits_of(exported), edited)
    assert (edited - original).abs().max() > 1e-3  # the export really is edited


def test_export_edits_file_matches_apply_edits(neox_dir, tmp_path, edits_file):
    out = tmp_path / "composed"
    result = invoke(["export", "--model", neox_dir, "--edits", edits_file, "--out", out])
    assert result.exit_code == 0, result.output
    assert "merged 3 edited matrices" in result.output and "remove-top rank 3" in result.output
    model = plain(neox_dir)
    with apply_edits(model, COMPOSITION):
        edited = logits_of(model)
    torch.testing.assert_close(logits_of(plain(out)), edited)


def test_export_edits_errors_are_one_line(neox_dir, tmp_path, edits_file):
    out = tmp_path / "never"
    line = one_line_error(invoke(["export", "--model", neox_dir, "--edits", edits_file, "--layer", "1", "--out", out]))
    assert "--edits replaces --layer" in line
    line = one_line_error(invoke(["export", "--model", neox_dir, "--edits", edits_file, "--edit", "magnitude"]
                                 + ["--out", out]))  # fmt: skip
    assert "--edits replaces --edit" in line
    line = one_line_error(invoke(["export", "--model", neox_dir, "--out", out]))
    assert "give --layer and --rank, or --edits FILE" in line
    line = one_line_error(
        invoke(["export", "--model", neox_dir, "--layer", "1", "--rank", "2", "--edit", "zero", "--out", out])
    )
    assert "edit 'zero' is not known" in line
    missing = tmp_path / "missing.json"
    line = one_line_error(invoke(["export", "--model", neox_dir, "--edits", missing, "--out", out]))
    assert "missing.json: cannot read the edits file" in line
    alien = save_edits(tmp_path / "alien.json", [Edit("model.layers.0.mlp.gate_proj", 2)])
    line = one_line_error(invoke(["export", "--model", neox_dir, "--edits", alien, "--out", out]))
    assert "the model has no module model.layers.0.mlp.gate_proj" in line
    assert not (out / "config.json").exists()


# --- run pythia --edits -------------------------------------------------------------------------------


def test_run_pythia_with_an_edits_file(neox_dir, edits_file, tmp_path):
    from transformers import AutoTokenizer

    from fasttrunc.runs import jsonable
    from fasttrunc.tasks.answers import aggregate_answers, encode_answers, score_answers
    from fasttrunc.tasks.user import load_task

    data = run_json(["--model", neox_dir, "--edits", edits_file, "--task", CAPITALS])
    rev = data["revisions"][0]
    assert rev["modules"] == {
        MLP_OUT_1: {"rank": 8, "kind": "keep-top", "method": "exact"},  # int(0.25 * min(32, 64))
        MLP_IN_0: {"rank": 3, "kind": "remove-top", "method": "exact"},
        QKV_1: {"rank": 2, "kind": "magnitude", "method": None},
    }
    assert data["config"]["edits"] == str(edits_file) and data["config"]["layers"] == []
    assert rev["record"]["edits_sha256"] == hashlib.sha256(edits_file.read_bytes()).hexdigest()
    model = plain(neox_dir)
    encoded = encode_answers(AutoTokenizer.from_pretrained(neox_dir), load_task(CAPITALS).examples)
    with apply_edits(model, COMPOSITION):
        expected = jsonable(aggregate_answers(score_answers(model, encoded)))
    assert rev["answers"][0]["truncated"]["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-6)
    assert rev["answers"][0]["truncated"]["log_loss"] != rev["answers"][0]["baseline"]["log_loss"]

    out = tmp_path / "run"
    result = invoke(["run", "pythia", "--model", neox_dir, "--edits", edits_file, "--task", CAPITALS, "--out", out])
    assert result.exit_code == 0, result.output
    assert "capitals, 20 examples: edits" in " ".join(result.output.split())  # the title names the edits
    again = run_json(["--config", out / "results.json"])
    assert again["revisions"][0]["modules"] == rev["modules"]
    assert again["revisions"][0]["answers"][0]["truncated"] == rev["answers"][0]["truncated"]


@pytest.mark.parametrize("extra", [["--layer", "1"], ["--rank", "2"], ["--matrix", "mlp_out"], ["--edit", "magnitude"]])
def test_run_pythia_refuses_edits_with_single_edit_options(neox_dir, edits_file, extra):
    line = one_line_error(invoke(["run", "pythia", "--model", neox_dir, "--edits", edits_file, *extra]))
    assert f"--edits replaces {extra[0]}" in line


def test_run_pythia_bad_edits_file_is_one_line(neox_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"edits": [{"module": "x", "rank": 2, "kind": "zero"}]}')
    line = one_line_error(invoke(["run", "pythia", "--model", neox_dir, "--edits", bad, "--task", CAPITALS]))
    assert "bad.json: edit 0" in line and "kind 'zero' is not known" in line
    alien = save_edits(tmp_path / "alien.json", [Edit("transformer.h.0.mlp.c_fc", 2)])
    line = one_line_error(invoke(["run", "pythia", "--model", neox_dir, "--edits", alien, "--task", CAPITALS]))
    assert "the model has no module transformer.h.0.mlp.c_fc" in line


def test_config_file_with_edits_and_command_line_overrides(neox_dir, edits_file, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{neox_dir}"\nedits = "{edits_file}"\ntask = "{CAPITALS}"\nn = 2\n')
    data = run_json(["--config", toml])
    assert sorted(data["revisions"][0]["modules"]) == sorted(e.module for e in COMPOSITION)
    # an explicit single edit replaces the file's edits
    data = run_json(["--config", toml, "--layer", "0", "--matrix", "mlp_in", "--rank", "2", "--edit", "magnitude"])
    assert data["config"]["edits"] is None
    assert data["revisions"][0]["modules"] == {MLP_IN_0: {"rank": 2, "kind": "magnitude", "method": None}}
    both = tmp_path / "both.toml"
    both.write_text(f'model = "{neox_dir}"\nedits = "{edits_file}"\nlayers = [1]\nrank = 2\n')
    line = one_line_error(invoke(["run", "pythia", "--config", both]))
    assert f"edits {edits_file} replaces layers, matrices, rank and edit" in line
    # and an explicit --edits replaces a file's single edit
    single = tmp_path / "single.toml"
    single.write_text(f'model = "{neox_dir}"\nlayers = [1]\nrank = 2\nedit = "remove-top"\ntask = "{CAPITALS}"\n')
    data = run_json(["--config", single, "--edits", edits_file, "--n", "2"])
    assert data["config"]["layers"] == [] and data["config"]["edit"] == "keep-top"
    assert len(data["revisions"][0]["modules"]) == len(COMPOSITION)
