"""`fasttrunc sweep pythia`: streamed cells, resume after SIGKILL, bad input, torchrun with gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fasttrunc.cli.main import app
from fasttrunc.models import tiny_neox

runner = CliRunner()
FASTTRUNC = Path(sys.executable).parent / "fasttrunc"
ENV = {**os.environ, "FASTTRUNC_BACKEND": "torch", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("neox-cli")
    config = tiny_neox.TinyNeoxConfig(hidden_size=32, num_layers=3, intermediate_size=64)
    tok = tiny_neox.build_tiny_tokenizer(config.names)
    torch.manual_seed(7)
    model = tiny_neox.tiny_neox_model(len(tok), config, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(model_dir, out=None, ranks="0.9,0.5,0.2,0.1,0.05,0"):
    args = ["sweep", "pythia", "--model", str(model_dir), "--ranks", ranks, "--n-prompts", "12", "--batch-size", "4"]
    return args + (["--out", str(out)] if out is not None else [])


def _cells(out: Path) -> list[tuple]:
    data = json.loads((out / "results.json").read_text())
    return [
        (c["layer"], c["matrix"], c["rank"], c["form"], json.dumps(c["select"]), json.dumps(c["report"]))
        for c in data["revisions"][0]["cells"]
    ]


def _cli(args, **kw):
    return subprocess.run([str(FASTTRUNC), *args], env=ENV, capture_output=True, text=True, timeout=300, **kw)


def test_streams_cells_and_resumes_after_sigkill(model_dir, tmp_path):
    whole = tmp_path / "whole"
    assert _cli(_args(model_dir, whole)).returncode == 0
    lines = (whole / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * 6 and len({json.loads(line)["config"] for line in lines}) == 1
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(FASTTRUNC), *_args(model_dir, killed)], env=ENV, stderr=subprocess.DEVNULL)
    log = killed / "cells.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = log.read_text().splitlines()
    assert 5 <= len(before) < 36 and not (killed / "results.json").exists()
    with open(log, "a") as handle:  # a torn last line, as a kill mid-write leaves it
        handle.write(before[-1][: len(before[-1]) // 2])
    resumed = _cli([*_args(model_dir, killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "cut short" in resumed.stderr
    assert _cells(killed) == _cells(whole)
    assert log.read_text().splitlines()[: len(before)] == before  # nothing written was lost


def test_resume_refusals_are_one_line_and_keep_the_file(model_dir, tmp_path):
    out = tmp_path / "o"
    assert _cli(_args(model_dir, out, ranks="0.5")).returncode == 0
    text = (out / "cells.jsonl").read_text()
    cases = [
        (_args(model_dir, ranks="0.5") + ["--resume"], "--resume continues the sweep in --out"),
        (_args(model_dir, out, ranks="0.5"), "pass --resume to continue it"),
        (_args(model_dir, out, ranks="0.4") + ["--resume"], "from another sweep config"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert (out / "cells.jsonl").read_text() == text
    lines = text.splitlines()
    (out / "cells.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    result = runner.invoke(app, _args(model_dir, out, ranks="0.5") + ["--resume"])
    assert result.exit_code == 2 and "line 2 is not a cell" in result.output


def test_cache_budget_too_small_exits_2(model_dir):
    result = runner.invoke(app, _args(model_dir, ranks="0.5") + ["--cache-budget", "0.000001"])
    assert result.exit_code == 2 and "holds less than one batch of one layer" in result.output


def test_a_hybrid_sweeps_its_mlp_everywhere_and_its_attention_where_it_is(tmp_path):
    """LFM2 with convolution blocks and one attention block (layer 2), the tiny tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_neox.build_tiny_tokenizer(tiny_neox.TinyNeoxConfig().names)
    kinds = ["conv", "conv", "full_attention", "conv"]
    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    )
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model("lfm2", vocab_size=len(tok), layer_types=kinds, **sizes, **ids)
    ).save_pretrained(tmp_path / "lfm2")
    tok.save_pretrained(tmp_path / "lfm2")
    args = _args(tmp_path / "lfm2", ranks="0.5")
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "mlp")]).exit_code == 0  # mlp_in, mlp_out: every layer
    assert len((tmp_path / "mlp" / "cells.jsonl").read_text().splitlines()) == 4 * 2
    result = runner.invoke(app, [*args, "--matrices", "attn_q"])
    assert result.exit_code == 2 and "matrix 'attn_q' is only in layer 2 of lfm2, not in layer 0" in result.output
    result = runner.invoke(
        app, [*args, "--matrices", "attn_q,mlp_out", "--layers", "2", "--out", str(tmp_path / "attn")]
    )
    assert result.exit_code == 0, result.output
    cells = [json.loads(line) for line in (tmp_path / "attn" / "cells.jsonl").read_text().splitlines()]
    assert sorted((c["cell"]["layer"], c["cell"]["matrix"]) for c in cells) == [(2, "attn_q"), (2, "mlp_out")]


def single_and_sharded(args: list[str], single: Path, sharded: Path, port: int) -> subprocess.CompletedProcess:
    """``args`` run in this process (one thread, as torchrun's ranks run) into ``single``, then under
    torchrun with two gloo ranks into ``sharded``; returns the torchrun run (checked to succeed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OMP_NUM_THREADS=1 in the ranks: the same reductions
    try:
        result = runner.invoke(app, [*args, "--out", str(single)])
        assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    done = subprocess.run(
        [*torchrun, str(FASTTRUNC), *args, "--out", str(sharded)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-1500:]
    return done


def test_torchrun_two_gloo_ranks_equal_one_process(model_dir, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    done = single_and_sharded(_args(model_dir, ranks="0.9,0.5,0"), single, sharded, 29531)
    assert _cells(sharded) == _cells(single)
    assert done.stdout.count("reported on the other") == 1  # rank 0 alone prints


def test_more_ranks_than_cells_is_one_line(model_dir):
    from fasttrunc.experiments import sweep

    class Five(sweep.Shard):
        world = 5

    config = sweep.SweepConfig(model=str(model_dir), layers=(0,), matrices=("mlp_in",), ranks=(0.5, 0), n=4)
    with pytest.raises(ValueError, match="5 ranks for 2 cells: start at most 2 processes"):
        sweep.run(config, shard=Five())


def test_screened_search_on_the_command_line(model_dir, tmp_path):
    result = runner.invoke(
        app, [*_args(model_dir, ranks="0.9,0.5,0.1,0"), "--search", "screened", "--keep", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    cells = json.loads(result.stdout)["revisions"][0]["cells"]
    assert sum(c["evaluated"] for c in cells) == 2 and len(cells) == 24
    for args, message in [
        (["--search", "screened", "--keep", "24"], "keep 24 is out of range for 24 cells"),
        (["--search", "screened", "--keep", "0"], "keep 0"),
    ]:
        bad = runner.invoke(app, [*_args(model_dir, ranks="0.9,0.5,0.1,0"), *args])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output


def _all_cells(out: Path) -> list[tuple]:
    data = json.loads((out / "results.json").read_text())
    return [
        (c["layer"], c["matrix"], c["rank"], c["evaluated"], c["estimate_prompts"], json.dumps(c["select"]),
         json.dumps(c["report"]))
        for c in data["revisions"][0]["cells"]
    ]  # fmt: skip


def test_screened_search_streams_and_resumes(model_dir, tmp_path):
    """Estimates are streamed when the rounds end, exact cells as they finish; a resume after the
    rounds evaluates only the exact cells it lacks, one before them screens again: same cells."""
    screened = [*_args(model_dir, ranks="0.9,0.5,0.1,0"), "--search", "screened", "--keep", "3"]
    whole = tmp_path / "whole"
    assert runner.invoke(app, [*screened, "--out", str(whole)]).exit_code == 0
    lines = (whole / "cells.jsonl").read_text().splitlines()
    flags = [json.loads(line)["cell"]["evaluated"] for line in lines]
    assert len(lines) == 24 and flags == [False] * 21 + [True] * 3
    for kept in (22, 10, 0):  # after the first exact cell; mid-way through the estimates; nothing
        out = tmp_path / f"kept{kept}"
        out.mkdir()
        (out / "cells.jsonl").write_text("".join(line + "\n" for line in lines[:kept]))
        resumed = runner.invoke(app, [*screened, "--out", str(out), "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert _all_cells(out) == _all_cells(whole), kept
        assert (out / "cells.jsonl").read_text().splitlines()[:kept] == lines[:kept]
