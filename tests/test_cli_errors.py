"""The CLI suite: every command with each kind of bad option exits 2, with one line on stderr, first.

Each bad command line must exit with code 2, print exactly one non-empty line on stderr that names
the offending option or value, print no traceback, and do no work: every experiment's and
benchmark's ``run`` (and the tiny model's trainer) is replaced by a recorder that must stay
uncalled. A few real subprocess calls check the installed entry point and time the error against
a run that would take hours.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttrunc.cli.main import app

try:  # click < 8.2 mixes stderr into output unless told not to
    runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
except TypeError:
    runner = CliRunner()

PYTHIA = ["--layer", "0", "--matrix", "mlp_in", "--rank", "2"]
# Every command, with the options it needs to get past its required ones.
COMMANDS = {
    "run recall": ["run", "recall"],
    "run memory": ["run", "memory"],
    "run pythia": ["run", "pythia", "--model", "EleutherAI/pythia-70m", *PYTHIA],
    "sweep pythia": ["sweep", "pythia", "--model", "EleutherAI/pythia-70m"],
    "bench lowrank": ["bench", "lowrank"],
    "bench svd": ["bench", "svd"],
}
WITH_OUT = list(COMMANDS)  # every one of them takes --out
WORK = {  # module -> attribute that does a command's work
    "fasttrunc.experiments.recall": "run",
    "fasttrunc.experiments.memory": "run",
    "fasttrunc.experiments.pythia": "run",
    "fasttrunc.experiments.sweep": "run",
    "fasttrunc.bench.lowrank": "run",
    "fasttrunc.bench.svd": "run",
    "fasttrunc.models.tiny_neox": "make_tiny_neox",
    "fasttrunc.hub": "load_model",
}


@pytest.fixture
def no_work(monkeypatch):
    """Replace every command's work by a recorder; the test asserts it stayed empty."""
    import importlib

    called: list[str] = []
    for module, name in WORK.items():

        def record(*args, _where=f"{module}.{name}", **kwargs):
            called.append(_where)
            raise AssertionError(f"{_where} was called")

        monkeypatch.setattr(importlib.import_module(module), name, record)
    return called


def check_refused(args: list[str], called: list[str], *words: str) -> str:
    """Run ``args``; assert exit 2, one stderr line holding ``words``, no traceback, no work."""
    result = runner.invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    shown = f"{args}: exit {result.exit_code}, stderr {result.stderr!r}, exception {result.exception!r}"
    assert result.exit_code == 2, shown
    assert len(lines) == 1, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    for word in words:
        assert word in lines[0], f"{word!r} missing: {shown}"
    assert not called, f"{called} ran before the error: {shown}"
    return lines[0]


# --- bad types, out of range, unknown choices, conflicts: (command, extra args, words shown) ----

BAD_OPTIONS = [
    # bad types
    ("run recall", ["--seed", "abc"], ["--seed"]),
    ("run recall", ["--steps", "1.5"], ["--steps"]),
    ("run recall", ["--alpha", "abc"], ["--alpha"]),
    ("run memory", ["--d", "x"], ["--d"]),
    ("run memory", ["--lr", "fast"], ["--lr"]),
    ("run pythia", ["--rank", "many"], ["many"]),
    ("run pythia", ["--layer", "x"], ["'x'"]),
    ("run pythia", ["--n", "ten"], ["--n"]),
    ("sweep pythia", ["--ranks", "0.5,y"], ["y"]),
    ("sweep pythia", ["--select-fraction", "half"], ["--select-fraction"]),
    ("bench lowrank", ["--shapes", "3by4"], ["3by4"]),
    ("bench lowrank", ["--rows", "1,a"], ["1,a"]),
    ("bench svd", ["--rank", "a"], ["--rank"]),
    ("bench svd", ["--reps", "two"], ["--reps"]),
    # out of range
    ("run recall", ["--seed", "99999999999999999999"], ["--seed", "99999999999999999999", "[0, 9223372036854775807]"]),
    ("run recall", ["--steps", "-1"], ["--steps", "-1"]),
    ("run recall", ["--alpha", "2"], ["alpha", "2"]),
    ("run recall", ["--alpha", "nan"], ["alpha", "nan"]),
    ("run recall", ["--track-every", "0"], ["track_every", "0"]),
    ("run memory", ["--batch-size", "0"], ["--batch-size", "0"]),
    ("run memory", ["--d", "1"], ["d", "1"]),
    ("run memory", ["--alpha", "1"], ["alpha", "1"]),
    ("run memory", ["--record-every", "0"], ["record_every", "0"]),
    ("run pythia", ["--n", "0"], ["--n", "0"]),
    ("run pythia", ["--batch-size", "-4"], ["--batch-size", "-4"]),
    ("run pythia", ["--rank", "-1"], ["-1"]),
    ("sweep pythia", ["--select-fraction", "1.5"], ["select_fraction", "1.5"]),
    ("sweep pythia", ["--seed", "-1"], ["--seed", "-1"]),
    ("bench lowrank", ["--reps", "0"], ["--reps", "0"]),
    ("bench lowrank", ["--ranks", "0"], ["rank", "0"]),
    ("bench svd", ["--rank", "0"], ["rank", "0"]),
    ("bench svd", ["--reps", "1000"], ["--reps", "1000"]),
    # unknown choices
    ("run recall", ["--preset", "huge"], ["preset", "huge"]),
    ("run recall", ["--device", "tpu"], ["tpu"]),
    ("run memory", ["--device", "cuda:7"], ["cuda:7"]),
    ("run pythia", ["--task", "poetry"], ["poetry"]),
    ("run pythia", ["--dtype", "float8"], ["float8"]),
    ("run pythia", ["--method", "guess"], ["guess"]),
    ("run pythia", ["--matrix", "mlp_sideways"], ["mlp_sideways"]),
    ("sweep pythia", ["--select-by", "vibes"], ["vibes"]),
    ("sweep pythia", ["--task", "ioi,poetry"], ["poetry"]),
    ("bench lowrank", ["--dtype", "int8"], ["int8"]),
    ("run recall", ["--no-such-option"], ["--no-such-option"]),
    # conflicting options
    ("run pythia", ["--revision", "step1", "--revisions", "step1,step2"], ["--revision", "--revisions"]),
    ("sweep pythia", ["--revision", "step1", "--revisions", "step2"], ["--revision", "--revisions"]),
    ("run pythia", ["--layer", "all"], ["--layer all"]),
    ("run recall", ["--steps", "10", "--track-every", "20"], ["track_every", "20"]),
    ("run memory", ["--steps", "10", "--record-every", "20"], ["record_every", "20"]),
]


@pytest.mark.parametrize("command, extra, words", BAD_OPTIONS, ids=[f"{c} {' '.join(e)}" for c, e, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_exit_2_before_any_work(no_work, command, extra, words):
    check_refused(COMMANDS[command] + extra, no_work, *words)


TINY_NEOX_BAD = [
    (["--steps", "0"], ["--steps", "0"]),
    (["--steps", "abc"], ["--steps", "abc"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--checkpoints", "5,x"], ["5,x"]),
    (["--steps", "4", "--checkpoints", "2,9"], ["9"]),
]


@pytest.mark.parametrize("extra, words", TINY_NEOX_BAD, ids=[" ".join(e) for e, _ in TINY_NEOX_BAD])
def test_make_tiny_neox_bad_option(no_work, tmp_path, extra, words):
    check_refused(["make-tiny-neox", str(tmp_path / "model"), *extra], no_work, *words)
    assert not (tmp_path / "model").exists()


# --- one rule per option: the same value gets the same answer from every command ---------------

SHARED = {
    "--seed": (["-1", "99999999999999999999"], [*COMMANDS, "make-tiny-neox"]),
    "--steps": (["0", "-1", "1000001"], ["run recall", "run memory", "make-tiny-neox"]),
    "--batch-size": (["0", "1000001"], ["run memory", "run pythia", "sweep pythia"]),
    "--n": (["0"], ["run pythia", "sweep pythia"]),
    "--reps": (["0", "101"], ["bench lowrank", "bench svd"]),
}


@pytest.mark.parametrize(
    "option, value", [(o, v) for o, (values, _) in SHARED.items() for v in values], ids=lambda x: str(x)
)
def test_an_option_follows_one_rule_in_every_command(no_work, tmp_path, option, value):
    messages = set()
    for command in SHARED[option][1]:
        args = ["make-tiny-neox", str(tmp_path / "m")] if command == "make-tiny-neox" else COMMANDS[command]
        line = check_refused([*args, option, value], no_work, option, value)
        messages.add(line.split(" (see ")[0])  # the hint names the command; the rule must not differ
    assert len(messages) == 1, messages


# --- bad --out: a file, under a file, read-only ------------------------------------------------


def _out_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    return {"file": (a_file, "is not a directory"), "under a file": (a_file / "sub", "which is a file")}


@pytest.mark.parametrize("command", WITH_OUT)
@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_bad_out_is_refused_first(no_work, tmp_path, command, kind):
    out, words = _out_cases(tmp_path)[kind]
    check_refused([*COMMANDS[command], "--out", str(out)], no_work, str(out), words)
    assert (tmp_path / "a-file").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_bad_make_tiny_neox_dir_is_refused_first(no_work, tmp_path, kind):
    out, words = _out_cases(tmp_path)[kind]
    check_refused(["make-tiny-neox", str(out)], no_work, str(out), words)


def _read_only(monkeypatch):
    """Root ignores permission bits, so a refusing mkdir and file creation stand in for a read-only place."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)


@pytest.mark.parametrize("command", [*WITH_OUT, "make-tiny-neox"])
def test_read_only_out_is_refused_first(no_work, tmp_path, monkeypatch, command):
    target = tmp_path / "results"
    if command == "make-tiny-neox":
        args = ["make-tiny-neox", str(target)]
    else:
        args = [*COMMANDS[command], "--out", str(target)]
    _read_only(monkeypatch)
    check_refused(args, no_work, str(target), "not writable")


# --- results written atomically ----------------------------------------------------------------


def test_results_and_plots_are_written_under_temporary_names(tmp_path, monkeypatch):
    """A crash while a plot is drawn leaves no results.json.tmp, no half plot, no staging folder."""
    import dataclasses

    from fasttrunc.cli import _common

    @dataclasses.dataclass
    class Fake:
        value: int = 3

        def to_dict(self):
            return {"value": self.value}

    seen: list[Path] = []

    def plots(result, folder):
        seen.append(folder)
        (folder / "a.png").write_bytes(b"png")
        return [folder / "a.png"]

    _common.emit(Fake(), as_json=True, out=tmp_path, tables=lambda r: [], plots=plots)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "results.json"]
    assert seen[0] != tmp_path  # drawn elsewhere, then renamed in
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == (tmp_path / "a.png").stat().st_mode & 0o777

    def crash(result, folder):
        (folder / "b.png").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _common.emit(Fake(7), as_json=True, out=tmp_path, tables=lambda r: [], plots=crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "results.json"]
    assert '"value": 7' in (tmp_path / "results.json").read_text()


# --- bad --model directories -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny saved GPT-NeoX and broken copies of it, one problem each."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from fasttrunc.models.tiny_neox import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tiny_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    good = root / "good"
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(good)
    tokenizer.save_pretrained(good)
    dirs = {"good": good}

    def copy(name: str) -> Path:
        dirs[name] = root / name
        shutil.copytree(good, dirs[name])
        return dirs[name]

    (copy("corrupt safetensors") / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    weights = (good / "model.safetensors").read_bytes()
    (copy("truncated safetensors") / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    blocked = copy("blocked pickle")
    (blocked / "model.safetensors").unlink()
    # A pickle that runs code when unpickled: torch.load(weights_only=True) refuses it.
    torch.save({"x": _Evil()}, blocked / "pytorch_model.bin")
    (copy("no weights") / "model.safetensors").unlink()
    dirs["empty"] = root / "empty"
    dirs["empty"].mkdir()
    dirs["only config.json"] = root / "config-only"
    dirs["only config.json"].mkdir()
    shutil.copy(good / "config.json", dirs["only config.json"])
    dirs["only pytorch_model.bin"] = root / "bin-only"
    dirs["only pytorch_model.bin"].mkdir()
    shutil.copy(blocked / "pytorch_model.bin", dirs["only pytorch_model.bin"])
    (copy("bad config.json") / "config.json").write_text("{not json")
    dirs["a file"] = root / "a-file"
    dirs["a file"].write_text("not a model")
    dirs["missing"] = root / "missing"
    return dirs


class _Evil:
    def __reduce__(self):
        return (print, ("this ran while unpickling",))


MODEL_PROBLEMS = {
    "corrupt safetensors": "corrupt",
    "truncated safetensors": "truncated",
    "no weights": "holds no weights",
    "empty": "it is empty",
    "only config.json": "holds no weights",
    "only pytorch_model.bin": "no config.json",
    "bad config.json": "not readable JSON",
    "a file": "is a file, not a directory",
    "missing": "does not exist",
}


@pytest.mark.parametrize("command", ["run pythia", "sweep pythia"])
@pytest.mark.parametrize("problem", list(MODEL_PROBLEMS))
def test_bad_model_directory_is_one_line_naming_it(no_work, model_dirs, command, problem):
    args = [*COMMANDS[command]]
    args[args.index("--model") + 1] = str(model_dirs[problem])
    check_refused(args, no_work, str(model_dirs[problem]), MODEL_PROBLEMS[problem])


def test_bad_revision_directory_is_found_before_the_first_revision_runs(no_work, model_dirs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_dirs["good"], model)
    shutil.copytree(model_dirs["good"], model / "revisions" / "step1")
    shutil.copytree(model_dirs["corrupt safetensors"], model / "revisions" / "step2")
    args = ["run", "pythia", "--model", str(model), *PYTHIA, "--revisions", "step1,step2"]
    check_refused(args, no_work, str(model / "revisions" / "step2"), "corrupt")


def test_blocked_pickle_is_one_line_before_any_scoring(model_dirs, monkeypatch):
    """Only loading finds what a pickle holds: the load is the first thing run does, and it stops there."""
    from fasttrunc.experiments import pythia

    scored: list[int] = []
    monkeypatch.setattr(pythia, "score", lambda *a, **k: scored.append(1))
    path = str(model_dirs["blocked pickle"])
    check_refused(["run", "pythia", "--model", path, *PYTHIA], scored, path, "torch.load(weights_only=True) refused")


def test_a_good_model_directory_passes_the_checks(model_dirs):
    from fasttrunc.hub import check_source

    assert check_source(str(model_dirs["good"]), None) == (str(model_dirs["good"]), None, True)


# --- the installed command, for real -----------------------------------------------------------


def _fasttrunc() -> list[str]:
    script = Path(sys.executable).parent / "fasttrunc"
    found = shutil.which("fasttrunc", path=str(script.parent))
    return [found] if found else [sys.executable, "-m", "fasttrunc.cli.main"]


REAL = [
    # Each would train or time for hours if the check came after the work.
    (["run", "recall", "--steps", "1000000", "--seed", "-5"], "--seed -5"),
    (["run", "memory", "--steps", "1000000", "--batch-size", "0"], "--batch-size 0"),
    (["run", "recall", "--steps", "1000000", "--out", "{file}"], "is not a directory"),
    (["make-tiny-neox", "{file}/model", "--steps", "1000000"], "which is a file"),
    (["run", "recall", "--steps", "1000000", "--seed", "x1"], "--seed 'x1'"),
    (["run", "recall", "--bogus"], "--bogus"),
]


@pytest.mark.parametrize("args, words", REAL, ids=[" ".join(a) for a, _ in REAL])
def test_the_installed_command_refuses_quickly(tmp_path, args, words):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    argv = [arg.replace("{file}", str(a_file)) for arg in args]
    start = time.perf_counter()
    done = subprocess.run(_fasttrunc() + argv, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    # A million steps take hours; the error must come before them (the bound leaves room for
    # importing torch on a busy 2-core machine, ~1-5 s).
    assert seconds < 30, f"{seconds:.1f} s"
    assert a_file.read_text() == "keep me"
