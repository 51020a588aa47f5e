"""The sweep with LASER's users in mind: task files, edit kinds, selection rules, composition, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fasttrunc.cli.main import app
from fasttrunc.edits import apply_edits, load_edits
from fasttrunc.experiments import sweep
from fasttrunc.experiments.prefix import AnswerSet
from fasttrunc.hub import load_model
from fasttrunc.selection import combined_key, selection_key
from fasttrunc.tasks.answers import aggregate_answers, encode_answers, score_answers
from fasttrunc.tasks.user import load_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"
CAPITALS, SENTIMENT = str(EXAMPLES / "capitals.jsonl"), str(EXAMPLES / "sentiment.csv")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 3-layer GPT-NeoX of width 16 with the real GPT-NeoX tokenizer, saved as a checkpoint."""
    import transformers

    path = tmp_path_factory.mktemp("neox-words")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(Path(__file__).parent / "data" / "gpt-neox-20b-tokenizer.json")
    )
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    torch.manual_seed(3)
    config = transformers.GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.GPTNeoXForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _config(model_dir, **kw):
    base = dict(
        model=str(model_dir), layers=(1, 2), matrices=("mlp_in", "mlp_out"), ranks=(0.5, 2, 0),
        tasks=(CAPITALS, SENTIMENT), select_fraction=0.4, batch_size=4, hub_record=False,
    )  # fmt: skip
    return sweep.SweepConfig(**{**base, **kw})


def test_task_files_and_edit_kinds_equal_plain_scoring(metrics_close, model_dir):
    """Every cell of every kind, on both task files, equals the edit applied and the model scored whole."""
    config = _config(model_dir, kinds=("keep-top", "remove-top", "magnitude"))
    rev = sweep.run(config).revisions[0]
    assert len(rev.cells) == 2 * 2 * 3 * 3
    assert {c.kind for c in rev.cells} == {"keep-top", "remove-top", "magnitude"}
    assert all(c.form == "dense" for c in rev.cells if c.kind != "keep-top")
    model, tok = load_model(str(model_dir), None, "float32", torch.device("cpu"))
    for task in (CAPITALS, SENTIMENT):
        file = load_task(task)
        split = rev.splits[task]
        assert split["mode"] == "shuffled" and split["seed"] == 0 and len(split["select_lines"]) == rev.n_select[task]
        assert rev.record["task_files"][task] == file.sha256
        lines = set(split["select_lines"])
        select = [e for e in file.examples if e.line in lines]
        report = [e for e in file.examples if e.line not in lines]
        enc_select, enc_report = encode_answers(tok, select), encode_answers(tok, report)
        metrics_close(rev.baseline_select[task], aggregate_answers(score_answers(model, enc_select, 4)))
        for cell in rev.cells[::5]:
            with apply_edits(model, cell.edits()):
                metrics_close(cell.select[task], aggregate_answers(score_answers(model, enc_select, 4)))
                metrics_close(cell.report[task], aggregate_answers(score_answers(model, enc_report, 4)))
    # the default metric with task files is accuracy, ties broken by the lower log-loss (LASER's rule)
    assert config.metric == "accuracy"
    for task in (CAPITALS, SENTIMENT):
        best = rev.best[task]
        top = max(rev.cells, key=lambda c: selection_key(c.select[task], "accuracy"))
        assert (best.layer, best.matrix, best.rank, best.kind) == top.key


def test_laser_split_takes_the_first_examples_in_file_order(model_dir):
    rev = sweep.run(_config(model_dir, split="laser", ranks=(0,), layers=(2,), matrices=("mlp_out",))).revisions[0]
    assert rev.splits[CAPITALS]["select_lines"] == [1, 2, 3, 4, 5, 6, 7, 8]  # 40% of 20, file order
    assert rev.splits[CAPITALS]["mode"] == "laser" and rev.splits[CAPITALS]["seed"] is None
    first = sweep.run(_config(model_dir, n=10, ranks=(0,), layers=(2,), matrices=("mlp_out",))).revisions[0]
    assert first.n_select[CAPITALS] + first.n_report[CAPITALS] == 10  # a task file's first n examples
    assert max(first.splits[CAPITALS]["select_lines"]) <= 10


def test_select_tasks_choose_one_cell_by_the_stated_rule(model_dir):
    config = _config(model_dir, select_tasks=(CAPITALS, SENTIMENT), select_by="log_loss")
    rev = sweep.run(config).revisions[0]
    joint = rev.joint
    assert joint is not None and joint.tasks == [CAPITALS, SENTIMENT] and "mean over tasks" in joint.rule
    base = {t: rev.baseline_select[t] for t in joint.tasks}
    keys = [combined_key({t: c.select[t] for t in joint.tasks}, base, "log_loss") for c in rev.cells]
    top = rev.cells[max(range(len(keys)), key=lambda i: keys[i])]
    assert (joint.layer, joint.matrix, joint.rank, joint.kind) == top.key
    assert joint.score == pytest.approx(max(keys)[0])


def test_greedy_composition_accepts_only_strict_gains_and_leaves_the_model_as_it_was(metrics_close, model_dir):
    model, tok = load_model(str(model_dir), None, "float32", torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = _config(model_dir, tasks=(CAPITALS,), layers=(0, 1, 2), compose="greedy", select_by="log_loss")
    file = load_task(CAPITALS)
    enc = AnswerSet(encode_answers(tok, file.examples))
    grid = sweep.sweep_model(
        model, {CAPITALS: enc}, {CAPITALS: 8}, [0, 1, 2], config.matrices, config.ranks, batch_size=4,
        select_by="log_loss",
    )  # fmt: skip
    start = max(grid.cells, key=lambda c: selection_key(c.select[CAPITALS], "log_loss"))
    sets = {CAPITALS: (enc.rows(0, 8), enc.rows(8, None))}
    composed = sweep._compose(model, grid, start, sets, config, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored bit-exactly
    assert all(type(m).__name__ != "TruncatedLinear" for m in model.modules())
    keys = [composed.start_key] + [step["key"] for step in composed.steps]
    assert all(a < b for a, b in zip(keys, keys[1:]))  # every accepted step strictly improved
    assert composed.key == keys[-1] and composed.score == keys[-1][0]
    assert composed.trials == len(composed.steps) + composed.rejected and composed.trials > 0
    assert len({e.module for e in composed.edits}) == len(composed.edits)
    # the composition, applied again, scores what the composition reported
    with apply_edits(model, composed.edits, factors=grid.factors):
        got = aggregate_answers(score_answers(model, enc.rows(0, 8).encoded, 4))
        assert -got.log_loss == pytest.approx(composed.score, rel=1e-6)
        metrics_close(composed.report[CAPITALS], aggregate_answers(score_answers(model, enc.rows(8, None).encoded, 4)))


def _cli(model_dir, *extra):
    args = ["sweep", "pythia", "--model", str(model_dir), "--layers", "1,2", "--matrices", "mlp_in,mlp_out"]
    args += ["--ranks", "0.5,2,0", "--select-fraction", "0.4", "--batch-size", "4", *extra]
    return runner.invoke(app, args)


def test_cli_task_file_kinds_compose_predictions_config_and_resume(model_dir, tmp_path):
    out = tmp_path / "run"
    preds = tmp_path / "preds.jsonl"
    extra = ["--task", f"{CAPITALS},{SENTIMENT}", "--edit", "keep-top,remove-top", "--compose", "greedy"]
    result = _cli(model_dir, *extra, "--out", str(out), "--save-predictions", str(preds))
    assert result.exit_code == 0, result.output
    assert "greedy composition" in result.output and "remove-top" in result.output
    edits = load_edits(out / "edits.json")
    data = json.loads((out / "results.json").read_text())
    rev = data["revisions"][0]
    assert [e.to_dict() for e in edits] == rev["composition"]["edits"]
    assert {c["kind"] for c in rev["cells"]} == {"keep-top", "remove-top"} and len(rev["cells"]) == 24
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 2 * (20 + 10)  # baseline and best cell, every example of both files
    assert {r["edit"] for r in rows} == {"baseline", "best"} and {r["split"] for r in rows} == {"select", "report"}
    # results.json fed back as the config reruns the same sweep (cells equal)
    again = runner.invoke(app, ["sweep", "pythia", "--config", str(out / "results.json"), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["revisions"][0]["cells"] == rev["cells"]
    # the command line wins over the file
    fewer = runner.invoke(app, ["sweep", "pythia", "--config", str(out / "results.json"), "--ranks", "0", "--json"])
    assert fewer.exit_code == 0 and len(json.loads(fewer.stdout)["revisions"][0]["cells"]) == 8
    # resume: cells.jsonl read back (LASER's metrics, kinds) gives the same cells
    lines = (out / "cells.jsonl").read_text().splitlines()
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "cells.jsonl").write_text("".join(line + "\n" for line in lines[:10]))
    resumed = _cli(model_dir, *extra, "--out", str(resumed_dir), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((resumed_dir / "results.json").read_text())["revisions"][0]["cells"] == rev["cells"]


def test_cli_screened_search_on_a_task_file(model_dir):
    result = _cli(model_dir, "--task", CAPITALS, "--search", "screened", "--keep", "2", "--json")
    assert result.exit_code == 0, result.output
    cells = json.loads(result.stdout)["revisions"][0]["cells"]
    assert len(cells) == 12 and sum(c["evaluated"] for c in cells) == 2


def test_cli_bad_input_is_one_line(model_dir, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "x"\nbogus = 1\n')
    cases = [
        (["--task", CAPITALS, "--select-tasks", "ioi"], "select task 'ioi' is not among the swept tasks"),
        (["--edit", "keep-top,bogus"], "edit kind"),
        (["--compose", "best"], "compose"),
        (["--task", f"{CAPITALS},{SENTIMENT}", "--search", "screened"], "screened search ranks cells by one task"),
        (["--save-predictions", str(tmp_path / "p.txt")], "write predictions to a .jsonl file"),
        (["--config", str(toml)], "unknown option(s) bogus"),
        (["--task", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--task", CAPITALS, "--select-by", "mean_p_the"], "select_by mean_p_the is not a metric of task"),
    ]
    for extra, message in cases:
        result = _cli(model_dir, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output, (extra, result.output)


def test_torchrun_two_gloo_ranks_with_task_files_kinds_and_composition(model_dir, tmp_path):
    from test_sweep_cli import single_and_sharded

    args = ["sweep", "pythia", "--model", str(model_dir), "--layers", "1,2", "--matrices", "mlp_out", "--ranks", "2,0"]
    args += ["--task", f"{CAPITALS},{SENTIMENT}", "--edit", "keep-top,remove-top", "--compose", "greedy"]
    args += ["--select-fraction", "0.4", "--batch-size", "4"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single_and_sharded(args, single, sharded, 29533)
    a, b = (json.loads((d / "results.json").read_text())["revisions"][0] for d in (single, sharded))
    assert a["cells"] == b["cells"] and a["composition"] == b["composition"] and a["best"] == b["best"]
    assert (sharded / "edits.json").read_text() == (single / "edits.json").read_text()
