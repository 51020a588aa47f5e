"""Task files (.jsonl, .csv): the shipped examples load, and each problem is one line naming file and line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fasttrunc.tasks.user import continuation, is_task_file, load_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"


def test_shipped_factual_file():
    path = EXAMPLES / "capitals.jsonl"
    task = load_task(path)
    assert task.name == "capitals"
    assert task.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not task.is_choice
    first = task.examples[0]
    assert (first.prompt, first.answer, first.distractor, first.line) == (
        "The capital of France is",
        "Paris",
        "London",
        1,
    )
    assert [e.line for e in task.examples] == list(range(1, len(task) + 1))
    assert any(" " in e.answer for e in task.examples)  # some answers are several words
    assert any(e.distractor is None for e in task.examples)


def test_shipped_choice_file():
    task = load_task(EXAMPLES / "sentiment.csv")
    assert task.is_choice
    assert task.examples[0].choices == ("positive", "negative")
    assert task.examples[0].line == 2  # the header is line 1
    json_list = [e for e in task.examples if e.answer == "yes"][0]
    assert json_list.choices == ("yes", "no")
    assert all(e.answer in (e.choices or ()) for e in task.examples)


def test_csv_and_jsonl_agree(tmp_path):
    (tmp_path / "t.jsonl").write_text(
        '{"prompt": "A b", "answer": "c d", "choices": ["c d", "e"], "note": 1}\n\n{"prompt": "x", "answer": "y"}\n'
    )
    (tmp_path / "t.csv").write_text('prompt,answer,choices,note\nA b,c d,"[""c d"", ""e""]",1\nx,y,,\n')
    a, b = load_task(tmp_path / "t.jsonl"), load_task(tmp_path / "t.csv")
    fields = [[(e.prompt, e.answer, e.distractor, e.choices) for e in t.examples] for t in (a, b)]
    assert fields[0] == fields[1]
    assert [e.line for e in b.examples] == [2, 3]  # the CSV header is line 1
    assert a.examples[1].line == 3  # blank lines are skipped, not renumbered
    assert a.examples[0].extra == {"note": 1} and b.examples[0].extra == {"note": "1"}


@pytest.mark.parametrize(
    ("suffix", "text", "message"),
    [
        (".jsonl", '{"prompt": "a", "answer": "b"}\n{"answer": "b"}\n', r"t\.jsonl:2: missing field 'prompt'"),
        (".jsonl", '{"prompt": "a", "answer": "  "}\n', r"t\.jsonl:1: field 'answer' is empty"),
        (".jsonl", '{"prompt": "a", "answer": "b", "choices": ["c", "d"]}\n', r":1: answer 'b' is not among"),
        (".jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n', r"t\.jsonl:2: not valid JSON"),
        (".jsonl", '["a", "b"]\n', r":1: a line must be a JSON object"),
        (".jsonl", '{"prompt": "a", "answer": 3}\n', r":1: field 'answer' is int"),
        (".jsonl", "\n\n", r"holds no examples"),
        (".csv", "prompt,answer\na,b\nc,\n", r"t\.csv:3: field 'answer' is empty"),
        (".csv", "prompt,choices\na,b\n", r"t\.csv:1: the header has no 'answer' column"),
        (".csv", "prompt,answer,choices\na,b,c|d\n", r"t\.csv:2: answer 'b' is not among"),
        (".csv", "prompt,answer,choices\na,b,[b\n", r"t\.csv:2: choices '\[b' is not a JSON list"),
        (".csv", "prompt,answer\na,b,c\n", r"t\.csv:2: 3 fields where the header has 2"),
        (".csv", "", r"holds no examples"),
        (".txt", "prompt,answer\n", r"unknown task file extension '\.txt'"),
    ],
)
def test_errors_name_file_and_line(tmp_path, suffix, text, message):
    path = tmp_path / f"t{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_task(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_binary(tmp_path):
    with pytest.raises(ValueError, match="cannot read the task file"):
        load_task(tmp_path / "absent.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "a", "answer": "b"}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not UTF-8"):
        load_task(tmp_path / "b.jsonl")


def test_continuation_rule_and_task_names():
    assert continuation("The capital is", "Paris") == " Paris"
    assert continuation("The capital is", " Paris") == " Paris"
    assert continuation("The capital is ", "Paris") == "Paris"
    assert is_task_file("data/x.JSONL") and is_task_file("x.csv") and not is_task_file("ioi")
