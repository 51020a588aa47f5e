"""Reproducibility records (offline and with a stubbed hub) and run configs from .toml / results.json."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest

from fasttrunc.records import hub_commit, load_run_config, run_record
from fasttrunc.runs import jsonable
from fasttrunc.selection import split_examples


@dataclass(frozen=True)
class Config:
    model: str
    ranks: tuple[float, ...] = (0.5,)
    seed: int = 0
    revision: str | None = None


class Tokenizer:
    name_or_path = "EleutherAI/pythia-70m"

    def __len__(self) -> int:
        return 11


def stub_hub(monkeypatch, model_info):
    module = types.ModuleType("huggingface_hub")
    module.model_info = model_info  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_record_with_a_hub_that_answers_and_one_that_does_not(monkeypatch, tmp_path):
    calls = []

    def answers(repo, revision=None, timeout=None):
        calls.append((repo, revision, timeout))
        return types.SimpleNamespace(sha="abc123")

    stub_hub(monkeypatch, answers)
    split = split_examples(10, 0.2, seed=7)
    tokenizer = Tokenizer()
    record = run_record(
        "EleutherAI/pythia-70m",
        "step1000",
        tokenizer=tokenizer,
        task_files={"capitals": "ff00"},
        split=split,
        svd_method="randomized",
        svd_seed=3,
        timeout=2.0,
    )
    assert record["hub_commit"] == "abc123" and calls == [("EleutherAI/pythia-70m", "step1000", 2.0)]
    assert record["tokenizer"]["name"] == "EleutherAI/pythia-70m"
    assert record["tokenizer"]["class"] == "Tokenizer" and record["tokenizer"]["vocab_size"] == 11
    assert record["split"] == {
        "mode": "shuffled",
        "seed": 7,
        "fraction": 0.2,
        "select": list(split.select),
        "report": list(split.report),
    }
    assert record["svd"] == {"method": "randomized", "seed": 3}
    assert record["task_files"] == {"capitals": "ff00"}
    assert {"torch", "python", "fasttrunc"} <= set(record["environment"])
    json.dumps(record)

    def offline(*args, **kwargs):
        raise OSError("no network")

    stub_hub(monkeypatch, offline)
    assert hub_commit("EleutherAI/pythia-70m") is None
    assert hub_commit(str(tmp_path)) is None  # a local directory has no hub hash
    assert run_record("x/y", hub=False)["hub_commit"] is None


def test_config_from_toml_and_from_results_json(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "runs/tiny"\nranks = [0.1, 0.01]\nseed = 3\n')
    options = load_run_config(toml, Config)
    assert options == {"model": "runs/tiny", "ranks": (0.1, 0.01), "seed": 3}
    assert Config(**options).ranks == (0.1, 0.01)
    (tmp_path / "table.toml").write_text('[config]\nmodel = "m"\n')
    assert load_run_config(tmp_path / "table.toml", ["model"]) == {"model": "m"}
    # a results.json fed back gives the same config
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"config": jsonable(Config(**options)), "revisions": []}))
    assert Config(**load_run_config(results, Config)) == Config(**options)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "run.toml",
            'model = "m"\nrank = 3\nlayer = 1\n',
            r"run\.toml: unknown option\(s\) layer, rank; allowed: model",
        ),
        ("run.toml", "model = \n", r"run\.toml: not valid TOML"),
        ("r.json", '{"model": "m"}', r"r\.json: a JSON config must be a results\.json"),
        ("r.json", "{", r"r\.json: not valid JSON"),
        ("r.json", '{"config": {"model": "m", "bogus": 1}}', r"unknown option\(s\) bogus"),
        ("run.yaml", "model: m\n", r"unknown config file extension '\.yaml'"),
    ],
)
def test_config_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_run_config(tmp_path / name, Config)
    assert "\n" not in str(info.value)
