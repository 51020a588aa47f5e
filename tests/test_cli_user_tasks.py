"""`fasttrunc run pythia` on task files: LASER's metrics, --save-predictions, --edit, --config and the record.

The model is a tiny random GPT-NeoX with the real GPT-NeoX tokenizer (tests/data), saved as a local
directory, so every shipped example file tokenizes as it would for Pythia.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_cli_targets_export import one_line_error
from typer.testing import CliRunner

from fasttrunc.cli.main import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"
CAPITALS = EXAMPLES / "capitals.jsonl"
SENTIMENT = EXAMPLES / "sentiment.csv"
TOKENIZER_JSON = Path(__file__).resolve().parent / "data" / "gpt-neox-20b-tokenizer.json"

runner = CliRunner()


def invoke(args: list[str]):
    return runner.invoke(app, [str(a) for a in args])


def save_tiny_neox(path: Path, seed: int = 3) -> Path:
    """A random 2-layer GPT-NeoX of width 32 and the real GPT-NeoX tokenizer, saved to ``path``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_JSON))
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # conftest turns Triton's interpreter on; interpreted kernels would make model tests crawl.
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    return save_tiny_neox(tmp_path_factory.mktemp("tiny-neox"))


LAST_MLP_IN = ["--layer", "-1", "--matrix", "mlp_in", "--rank", "0"]
MLP_IN_1 = "gpt_neox.layers.1.mlp.dense_h_to_4h"


def run_json(args: list) -> dict:
    result = invoke(["run", "pythia", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def direct_metrics(model_dir: Path, task: Path, edit=None):
    """The task's AnswerMetrics computed straight from the library, optionally with ``edit`` applied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttrunc.edits import apply_edits
    from fasttrunc.runs import jsonable
    from fasttrunc.tasks.answers import aggregate_answers, encode_answers, score_answers
    from fasttrunc.tasks.user import load_task

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    encoded = encode_answers(AutoTokenizer.from_pretrained(model_dir), load_task(task).examples)
    if edit is None:
        return jsonable(aggregate_answers(score_answers(model, encoded)))
    with apply_edits(model, edit):
        return jsonable(aggregate_answers(score_answers(model, encoded)))


def test_task_files_are_scored_with_laser_metrics_and_recorded(neox_dir):
    from fasttrunc.edits import Edit

    data = run_json(["--model", neox_dir, *LAST_MLP_IN, "--task", f"{CAPITALS},{SENTIMENT}"])
    rev = data["revisions"][0]
    assert rev["baseline"] is None and rev["prompts"] == [] and data["n_prompts"] == 0
    capitals, sentiment = rev["answers"]
    assert (capitals["task"], sentiment["task"]) == ("capitals", "sentiment")
    assert capitals["n"] == len(CAPITALS.read_text().splitlines())
    assert capitals["sha256"] == hashlib.sha256(CAPITALS.read_bytes()).hexdigest()
    edit = [Edit(MLP_IN_1, 0, "keep-top")]
    for task, path in ((capitals, CAPITALS), (sentiment, SENTIMENT)):
        for variant, expected in (("baseline", direct_metrics(neox_dir, path)), ("truncated", None)):
            expected = expected or direct_metrics(neox_dir, path, edit)
            for key, value in expected.items():
                if isinstance(value, float):
                    assert task[variant][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (path.name, variant, key)
                else:
                    assert task[variant][key] == value, (path.name, variant, key)
    assert capitals["baseline"]["mean_of_ratios"] is not None and capitals["baseline"]["top5_accuracy"] is not None
    assert sentiment["baseline"]["top5_accuracy"] is None and sentiment["baseline"]["mean_of_ratios"] is None
    assert capitals["baseline"]["log_loss"] != capitals["truncated"]["log_loss"]  # rank 0 changes the model
    assert rev["modules"] == {MLP_IN_1: {"rank": 0, "kind": "keep-top", "method": "exact"}}

    record = rev["record"]
    assert record["model"] == str(neox_dir) and record["revision"] is None and record["hub_commit"] is None
    assert record["tokenizer"]["name"] == str(neox_dir) and record["tokenizer"]["vocab_size"] > 50000
    assert record["task_files"] == {
        "capitals": capitals["sha256"],
        "sentiment": hashlib.sha256(SENTIMENT.read_bytes()).hexdigest(),
    }
    assert record["split"] == {"mode": "all", "seed": 0}
    assert record["svd"] == {"method": "exact", "seed": None} and record["edits_sha256"] is None
    assert record["environment"]["torch"] == torch.__version__ and record["environment"]["transformers"]


def test_tables_show_each_task_file_and_the_metrics(neox_dir):
    result = invoke(["run", "pythia", "--model", neox_dir, *LAST_MLP_IN, "--task", f"factual,{CAPITALS}", "--n", "4"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "factual, 4 prompts" in out and "capitals, 4 examples" in out  # --n: a task file's first 4
    for label in ("top-5 accuracy", "top-10 accuracy", "mean log P(answer)", "log-loss", "P(answer)/P(distractor)"):
        assert label in out
    assert "keep-top" in out


def test_builtin_and_file_tasks_together_and_randomized_svd_seed(neox_dir):
    args = ["--model", neox_dir, *LAST_MLP_IN[:4], "--rank", "3", "--task", f"ioi,{SENTIMENT}", "--n", "6"]
    data = run_json([*args, "--method", "randomized", "--seed", "4"])
    rev = data["revisions"][0]
    assert data["n_prompts"] == 6 and len(rev["prompts"]) == 6 and rev["baseline"]["mean_p_correct"] > 0
    assert [t["task"] for t in rev["answers"]] == ["sentiment"] and rev["answers"][0]["n"] == 6
    assert rev["record"]["svd"] == {"method": "randomized", "seed": 4}
    again = run_json([*args, "--method", "randomized", "--seed", "4"])["revisions"][0]
    assert again["answers"][0]["truncated"] == rev["answers"][0]["truncated"]  # the seed fixes the SVD


@pytest.mark.parametrize("kind", ["remove-top", "magnitude"])
def test_edit_kind_is_applied_and_reported(neox_dir, kind):
    from fasttrunc.edits import Edit

    data = run_json(["--model", neox_dir, *LAST_MLP_IN[:4], "--rank", "2", "--edit", kind, "--task", CAPITALS])
    rev = data["revisions"][0]
    method = None if kind == "magnitude" else "exact"
    assert rev["modules"] == {MLP_IN_1: {"rank": 2, "kind": kind, "method": method}}
    assert data["config"]["edit"] == kind
    expected = direct_metrics(neox_dir, CAPITALS, [Edit(MLP_IN_1, 2, kind)])
    assert rev["answers"][0]["truncated"]["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-6)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_save_predictions_per_example(neox_dir, tmp_path, suffix):
    target = tmp_path / "preds" / f"predictions{suffix}"
    data = run_json(
        ["--model", neox_dir, *LAST_MLP_IN, "--task", f"{CAPITALS},{SENTIMENT}", "--save-predictions", target]
    )
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in target.read_text().splitlines()]
    else:
        with target.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    answers = data["revisions"][0]["answers"]
    assert len(rows) == 2 * sum(t["n"] for t in answers)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary file left
    by_key = {(r["task"], r["variant"], int(r["line"])): r for r in rows}
    for task in answers:
        for variant in ("baseline", "truncated"):
            for p in task[f"{variant}_predictions"]:
                row = by_key[(task["task"], variant, p["line"])]
                assert row["prompt"] == p["prompt"] and row["answer"] == p["answer"]
                assert float(row["log_prob"]) == pytest.approx(p["log_prob"], rel=1e-9)
    choice_row = by_key[("sentiment", "baseline", 2)]
    assert choice_row["predicted_choice"] in ("positive", "negative")
    lps = choice_row["choice_log_probs"]
    assert len(json.loads(lps) if isinstance(lps, str) else lps) == 2


def test_save_predictions_of_a_builtin_task(neox_dir, tmp_path):
    target = tmp_path / "ioi.jsonl"
    run_json(["--model", neox_dir, *LAST_MLP_IN, "--task", "ioi", "--n", "3", "--save-predictions", target])
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 6 and {r["variant"] for r in rows} == {"baseline", "truncated"}
    assert all(r["task"] == "ioi" and 0 <= r["p_correct"] <= 1 and r["subject"] for r in rows)


def test_config_file_options_and_command_line_overrides(neox_dir, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'model = "{neox_dir}"\nlayers = [-1]\nmatrices = ["mlp_in"]\nrank = 0\ntask = "{CAPITALS}"\nn = 3\n'
    )
    data = run_json(["--config", toml])
    assert data["config"]["rank"] == 0 and data["config"]["n"] == 3 and data["config"]["model"] == str(neox_dir)
    assert data["revisions"][0]["answers"][0]["n"] == 3
    data = run_json(["--config", toml, "--rank", "5", "--n", "2"])  # explicit options win over the file
    assert data["config"]["rank"] == 5 and data["config"]["n"] == 2
    assert data["revisions"][0]["modules"][MLP_IN_1]["rank"] == 5


def test_results_json_reruns_as_config(neox_dir, tmp_path):
    out = tmp_path / "first"
    args = ["--model", neox_dir, *LAST_MLP_IN[:4], "--rank", "0.25", "--edit", "remove-top"]
    result = invoke(["run", "pythia", *args, "--task", f"factual,{CAPITALS}", "--n", "5", "--out", out])
    assert result.exit_code == 0, result.output
    first = json.loads((out / "results.json").read_text())
    again = run_json(["--config", out / "results.json"])
    assert again["config"] == first["config"]
    rev, rev2 = first["revisions"][0], again["revisions"][0]
    assert rev2["modules"] == rev["modules"] and rev2["truncated"] == rev["truncated"]
    assert rev2["answers"][0]["truncated"] == rev["answers"][0]["truncated"]


@pytest.mark.parametrize(
    "text, words",
    [
        ('colour = "red"\n', ["unknown option(s) colour", "allowed:", "layers", "rank", "task"]),
        ("layers = [\n", ["not valid TOML"]),
    ],
)
def test_bad_config_is_one_line(neox_dir, tmp_path, text, words):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    line = one_line_error(invoke(["run", "pythia", "--model", neox_dir, *LAST_MLP_IN, "--config", toml]))
    for word in words:
        assert word in line


def test_bad_tasks_are_one_line(neox_dir, tmp_path):
    base = ["run", "pythia", "--model", neox_dir, *LAST_MLP_IN]
    line = one_line_error(invoke([*base, "--task", "trivia"]))
    assert "task 'trivia' is not known" in line and "ioi, factual" in line and ".jsonl, .csv" in line
    line = one_line_error(invoke([*base, "--task", "ioi,factual"]))
    assert "at most one of ioi, factual" in line
    line = one_line_error(invoke([*base, "--task", tmp_path / "missing.jsonl"]))
    assert "missing.jsonl: cannot read the task file" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    line = one_line_error(invoke([*base, "--task", bad]))
    assert "bad.jsonl:2: missing field 'answer'" in line
    line = one_line_error(invoke([*base, "--task", CAPITALS, "--save-predictions", tmp_path / "p.txt"]))
    assert "--save-predictions" in line and "'.txt'" in line and ".jsonl, .csv" in line
    line = one_line_error(invoke([*base, "--edit", "dropout"]))
    assert "edit 'dropout' is not known" in line and "keep-top, remove-top, magnitude" in line
    line = one_line_error(invoke(["run", "pythia", "--model", neox_dir, "--task", CAPITALS]))
    assert "give --layer and --rank" in line
