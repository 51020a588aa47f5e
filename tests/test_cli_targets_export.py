"""`fasttrunc targets`, `fasttrunc export`, and `run pythia` / `sweep pythia` on a Llama-shaped model.

The Llama directory is a tiny ``LlamaConfig`` with random weights and the SentencePiece-style
tokenizer of test_tokenizers (a ``<s>`` BOS added with special tokens, no pad token).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_tokenizers import sentencepiece_tokenizer
from typer.testing import CliRunner

from fasttrunc.cli.main import app
from fasttrunc.truncation import Targets, truncate_

runner = CliRunner()


def invoke(args: list[str]):
    return runner.invoke(app, args)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # conftest turns Triton's interpreter on; interpreted kernels would make model tests crawl.
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time


LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = sentencepiece_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **LLAMA)
    torch.manual_seed(5)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def config_only_dir(llama_dir, tmp_path_factory):
    """The Llama directory's config.json alone: describing it cannot read any weight."""
    path = tmp_path_factory.mktemp("config-only")
    shutil.copy(llama_dir / "config.json", path / "config.json")
    return path


# --- fasttrunc targets ----------------------------------------------------------------------------


def test_targets_table_from_the_config_alone(config_only_dir):
    result = invoke(["targets", "--model", str(config_only_dir), "--layer", "-1", "--matrix", "mlp_in,attn_qkv"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "family llama" in out and "2 layers in model.layers" in out
    expected = {
        "model.layers.1.mlp.gate_proj": "64 x 32",
        "model.layers.1.self_attn.q_proj": "32 x 32",
        "model.layers.1.self_attn.k_proj": "16 x 32",  # 2 key-value heads of 8
        "model.layers.1.self_attn.v_proj": "16 x 32",
    }
    for name, shape in expected.items():
        row = next(line for line in out.splitlines() if name in line)
        assert row.split()[0] == "1" and shape in row
    assert "model.layers.0." not in out and "up_proj" not in out and "o_proj" not in out


def test_targets_json_matches_the_real_model(llama_dir):
    from transformers import AutoModelForCausalLM

    result = invoke(["targets", "--model", str(llama_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["family"] == "llama" and data["n_layers"] == 2 and data["matched_by"] == "model_type"
    assert [layer["index"] for layer in data["layers"]] == [0, 1]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    seen = 0
    for layer in data["layers"]:
        assert set(layer["matrices"]) == {"mlp_in", "mlp_up", "mlp_out", "attn_qkv", "attn_out"}
        for mats in layer["matrices"].values():
            for m in mats:
                assert list(model.get_submodule(m["name"]).weight.shape) == m["shape"]
                seen += 1
    assert seen == 2 * 7


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--matrix", "mlp_middle"], ["matrix 'mlp_middle' is not known", "mlp_up", "attn_q"]),
        (["--layer", "2"], ["layer 2 is out of range", "0..1 or -2..-1"]),
        (["--layer", "x"], ["layer 'x'"]),
    ],
)
def test_targets_bad_input_is_one_line(config_only_dir, extra, words):
    line = one_line_error(invoke(["targets", "--model", str(config_only_dir)] + extra))
    for word in words:
        assert word in line


def test_targets_alias_the_family_lacks_names_what_it_has(tmp_path):
    from transformers import GPTNeoXConfig

    GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    line = one_line_error(invoke(["targets", "--model", str(tmp_path), "--matrix", "mlp_up"]))
    assert "does not exist in gpt-neox; it has: mlp_in, mlp_out, attn_qkv, attn_out" in line
    line = one_line_error(invoke(["targets", "--model", str(tmp_path), "--matrix", "attn_q"]))
    assert "'attn_qkv'" in line


def test_targets_without_a_family_or_a_config(tmp_path):
    from transformers import MambaConfig

    MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=100, state_size=4).save_pretrained(tmp_path / "mamba")
    line = one_line_error(invoke(["targets", "--model", str(tmp_path / "mamba")]))
    assert "matches no known model family" in line and "backbone.layers.<i>.{mixer.in_proj" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(invoke(["targets", "--model", str(tmp_path / "empty")]))
    assert "cannot read a model config from" in line
    line = one_line_error(invoke(["targets", "--model", str(tmp_path / "missing" / "dir")]))
    assert "does not exist" in line


def test_targets_of_a_hybrid_show_where_its_attention_is(tmp_path):
    """LFM2's convolution blocks beside one attention block, read from the config alone."""
    from transformers import AutoConfig

    kinds = ["conv", "conv", "full_attention", "conv"]
    config = AutoConfig.for_model("lfm2", hidden_size=32, intermediate_size=64, num_hidden_layers=4, layer_types=kinds)
    config.save_pretrained(tmp_path)
    result = invoke(["targets", "--model", str(tmp_path), "--matrix", "attn", "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.output)
    assert [layer["index"] for layer in described["layers"]] == [2]  # every layer: the attention where it is
    assert described["only_in"] == dict.fromkeys(["attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out"], [2])
    result = invoke(["targets", "--model", str(tmp_path), "--layer", "1-2"])
    assert result.exit_code == 0 and "model.layers.2.self_attn.q_proj" in result.output
    assert "model.layers.1.feed_forward.w1" in result.output and "only in layer 2" in result.output
    line = one_line_error(invoke(["targets", "--model", str(tmp_path), "--matrix", "attn_q", "--layer", "1"]))
    assert (
        "matrix 'attn_q' is only in layer 2 of lfm2, not in layer 1" in line
        and "--layer 2, in a sweep --layers 2" in line
    )


def test_targets_offline_hub_id_is_the_hub_error(offline):
    start = time.perf_counter()
    line = one_line_error(invoke(["targets", "--model", "EleutherAI/pythia-no-such-model"]))
    assert time.perf_counter() - start < 30
    assert "cannot fetch model 'EleutherAI/pythia-no-such-model'" in line and "--model /path/to/local/dir" in line


# --- run pythia as the design card writes it --------------------------------------------------------


def test_run_pythia_defaults_are_shown_and_typed_command_gives_the_hub_error(offline):
    result = runner.invoke(app, ["run", "pythia", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "[default: EleutherAI/pythia-1b]" in result.output and "[default: mlp_in]" in result.output
    start = time.perf_counter()
    line = one_line_error(invoke(["run", "pythia", "--layer", "12", "--rank", "0.05"]))
    assert time.perf_counter() - start < 30
    assert "cannot fetch model 'EleutherAI/pythia-1b'" in line and "--model /path/to/local/dir" in line


def test_run_and_sweep_pythia_on_a_llama_shaped_model(llama_dir):
    args = ["run", "pythia", "--model", str(llama_dir), "--layer", "-1", "--matrix", "mlp_in", "--rank", "0.5"]
    result = invoke(args + ["--n", "12", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rev = data["revisions"][0]
    assert rev["modules"] == {"model.layers.1.mlp.gate_proj": {"rank": 16, "kind": "keep-top", "method": "exact"}}
    assert data["n_prompts"] == 12 and len(rev["prompts"]) == 12
    assert all(p["text"].endswith(" to") for p in rev["prompts"])
    assert rev["baseline"]["mean_p_correct"] != rev["truncated"]["mean_p_correct"]
    result = invoke(
        ["sweep", "pythia", "--model", str(llama_dir), "--layers", "1", "--matrices", "mlp_in,attn_qkv"]
        + ["--ranks", "0.5,0", "--task", "ioi,factual", "--n", "10", "--json"]
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.output)["revisions"][0]
    assert len(sweep["cells"]) == 2 * 2
    assert set(sweep["best"]) == {"ioi", "factual"}


# --- fasttrunc export -------------------------------------------------------------------------------

EXPORT = ["--layer", "-1", "--matrix", "mlp_in,attn_qkv", "--rank", "0.25"]

# Run in a fresh interpreter that never imports fasttrunc: plain transformers must load the export.
PLAIN_LOAD = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, ids_file, out_file = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_file)).logits
    kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight")})
    torch.save({"logits": logits, "kinds": kinds, "vocab": len(tokenizer),
                "fasttrunc": any(name.startswith("fasttrunc") for name in sys.modules)}, out_file)
    """
)


def test_export_loads_as_a_plain_model_and_predicts_what_the_truncated_model_does(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    result = invoke(["export", "--model", str(llama_dir), *EXPORT, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    names = ["model.layers.1.mlp.gate_proj"] + [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    assert sorted(summary["modules"]) == sorted(names)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    ids = torch.tensor([sentencepiece_tokenizer().encode("Then, Mary and John went to the store. John gave a")])
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "plain.pt")],
        check=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    plain = torch.load(tmp_path / "plain.pt")
    assert not plain["fasttrunc"] and "TruncatedLinear" not in plain["kinds"]
    assert plain["vocab"] == len(sentencepiece_tokenizer())

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        original = model(input_ids=ids).logits
        with truncate_(model, Targets(layers=[-1], matrices=["mlp_in", "attn_qkv"]), 0.25):
            truncated = model(input_ids=ids).logits
    torch.testing.assert_close(plain["logits"], truncated)  # float32 tolerances
    assert (plain["logits"] - original).abs().max() > 1e-3  # the export really is truncated
    exported = AutoModelForCausalLM.from_pretrained(out)
    gate = exported.get_submodule("model.layers.1.mlp.gate_proj").weight
    s = torch.linalg.svdvals(gate.detach().double())
    assert s[7] > 1e-3 * s[0] and s[8] < 1e-5 * s[0]  # rank int(0.25 * min(64, 32)) = 8, to float32 rounding


def test_export_refuses_a_non_empty_out_before_any_work(llama_dir, tmp_path, monkeypatch):
    import fasttrunc.hub

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with monkeypatch.context() as mp:
        mp.setattr(fasttrunc.hub, "load_model", no_load)
        line = one_line_error(invoke(["export", "--model", str(llama_dir), *EXPORT, "--out", str(out)]))
        assert "is not empty" in line and "--overwrite" in line
        (tmp_path / "file").write_text("x")
        line = one_line_error(invoke(["export", "--model", str(llama_dir), *EXPORT, "--out", str(tmp_path / "file")]))
        assert "exists and is not a directory" in line
        line = one_line_error(
            invoke(["export", "--model", str(llama_dir), *EXPORT[:2], "--matrix", "mlp_middle", "--rank", "1"]
                   + ["--out", str(tmp_path / "new")])
        )  # fmt: skip
        assert "matrix 'mlp_middle' is not known" in line and not (tmp_path / "new").exists()
    assert (out / "notes.txt").read_text() == "keep me"
    result = invoke(["export", "--model", str(llama_dir), *EXPORT, "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / "notes.txt").read_text() == "keep me"


def test_export_bad_layer_writes_no_checkpoint(llama_dir, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(
        invoke(["export", "--model", str(llama_dir), "--layer", "5", "--rank", "0.5", "--out", str(out)])
    )
    assert "layer 5 is out of range" in line and "0..1" in line
    assert not (out / "config.json").exists()


def test_export_keeps_the_dtype_and_predicts_to_its_rounding(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    result = invoke(["export", "--model", str(llama_dir), *EXPORT, "--dtype", "bfloat16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ids = torch.tensor([sentencepiece_tokenizer().encode("When Anna and Kate went to the garden, Kate gave a")])
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        original = model(input_ids=ids).logits.float()
        with truncate_(model, Targets(layers=[-1], matrices=["mlp_in", "attn_qkv"]), 0.25):
            truncated = model(input_ids=ids).logits.float()
        exported = plain(input_ids=ids).logits.float()
    # bfloat16 keeps 8 bits of mantissa (eps 2^-7): the merged b @ a and the two factors round
    # differently, by a few eps of the logits' scale; truncating moves them far more.
    scale = float(truncated.abs().max())
    torch.testing.assert_close(exported, truncated, rtol=1.6e-2, atol=2**-7 * 2 * scale)
    assert float((truncated - original).abs().max()) > 10 * 2**-7 * scale
