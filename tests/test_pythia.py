"""Pythia experiments: model loading, the LASER sweep's bookkeeping, the CLI, and the tiny trained
GPT-NeoX that shows the paper's effect end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from fasttrunc import hub
from fasttrunc.cli.main import app
from fasttrunc.experiments import pythia, sweep
from fasttrunc.models import tiny_neox

runner = CliRunner()


def invoke(args: list[str]):
    return runner.invoke(app, args)


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # conftest turns Triton's interpreter on; interpreted kernels would make model tests crawl.
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    """An untrained tiny GPT-NeoX + word-level tokenizer saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("random-neox")
    config = tiny_neox.TinyNeoxConfig(hidden_size=32, num_layers=2, intermediate_size=128)
    tok = tiny_neox.build_tiny_tokenizer(config.names)
    torch.manual_seed(3)
    model = tiny_neox.tiny_neox_model(len(tok), config, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# The default recipe (seed 0), as the README measures it over seeds 0-4; the test does not shrink
# the model, so what it checks is what the README reports.
TEST_RECIPE = dict(checkpoints=(1500, 3000))


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """The tiny model trained once per test run (about a minute on a busy 2-core CPU)."""
    path = tmp_path_factory.mktemp("tiny-neox")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTTRUNC_BACKEND", "torch")
        tiny_neox.make_tiny_neox(path, tiny_neox.TinyNeoxConfig(**TEST_RECIPE))
    return path


# --- loading ------------------------------------------------------------------------------------


def test_load_local_directory_and_revisions(random_dir):
    model, tok = hub.load_model(str(random_dir), dtype="float32")
    assert type(model).__name__ == "GPTNeoXForCausalLM" and not model.training
    assert model.config.use_parallel_residual
    assert tok.encode(" Mary", add_special_tokens=False) == [tok.convert_tokens_to_ids("Mary")]
    with pytest.raises(ValueError, match="revision 'step5' is not in local model directory"):
        hub.load_model(str(random_dir), revision="step5")
    with pytest.raises(ValueError, match="does not exist"):
        hub.load_model(str(random_dir / "missing"))
    with pytest.raises(ValueError, match="dtype 'float8'"):
        hub.load_model(str(random_dir), dtype="float8")


def test_hub_id_offline_is_one_line_exit_2(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    start = time.perf_counter()
    result = invoke(
        [
            "run",
            "pythia",
            "--model",
            "EleutherAI/pythia-no-such-model",
            "--layer",
            "0",
            "--matrix",
            "mlp_in",
            "--rank",
            "0.1",
        ]
    )
    assert time.perf_counter() - start < 30
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "EleutherAI/pythia-no-such-model" in lines[0] and "--model /path/to/local/dir" in lines[0]
    assert "Traceback" not in result.output


# --- the sweep's bookkeeping ----------------------------------------------------------------------


def test_sweep_factorizes_each_matrix_once_and_evaluates_each_cell_once(random_dir, monkeypatch):
    import fasttrunc.truncation as truncation

    svd_calls: list[list[tuple[tuple[int, ...], int]]] = []
    real_svd = truncation.truncated_svd

    def counting_svd(weights, ranks, **kw):
        svd_calls.append(sorted((tuple(w.shape), k) for w, k in zip(weights, ranks)))
        return real_svd(weights, ranks, **kw)

    from fasttrunc.experiments.prefix import PrefixCache

    scored: list[list[str]] = []
    captured: list[int] = []
    real_score, real_capture = PrefixCache.score, PrefixCache.capture

    def counting_score(self, layer, sets, which=None):
        names = sorted(n for n, m in self.model.named_modules() if type(m).__name__ == "TruncatedLinear")
        scored.append(names)
        return real_score(self, layer, sets, which)

    def counting_capture(self, sets, layers):
        captured.append(len(sets))
        return real_capture(self, sets, layers)

    monkeypatch.setattr(truncation, "truncated_svd", counting_svd)
    monkeypatch.setattr(PrefixCache, "score", counting_score)
    monkeypatch.setattr(PrefixCache, "capture", counting_capture)
    ranks = [0.5, 0.25, 3, 0]
    config = sweep.SweepConfig(model=str(random_dir), layers=[0, 1], matrices=["mlp_in", "mlp_out"], ranks=ranks, n=20)
    result = sweep.run(config)
    rev = result.revisions[0]
    # One factorization for the whole sweep (none per cell): mlp_in (128 x 32) and mlp_out
    # (32 x 128) of both layers, each up to the largest rank any cell needs: int(0.5 * 32) = 16,
    # batched into one SVD per shape.
    assert svd_calls == [[((32, 128), 16)] * 2 + [((128, 32), 16)] * 2]
    assert rev.svd_calls == 2 and rev.matrices_factorized == 4
    assert len(rev.cells) == 2 * 2 * len(ranks) == len(scored)  # one scoring pass per cell
    assert captured == [1, 2]  # the budget probe (one batch), then one unedited pass: the baseline
    keys = [(c.layer, c.matrix, c.rank) for c in rev.cells]
    assert len(set(keys)) == len(keys)
    assert [c.ranks for c in rev.cells[:4]] == [{"gpt_neox.layers.0.mlp.dense_h_to_4h": k} for k in (16, 8, 3, 0)]
    assert rev.n_select == {"ioi": 4} and rev.n_report == {"ioi": 16}
    best = rev.best["ioi"]
    assert best.select_score == max(c.select["ioi"].mean_p_correct for c in rev.cells)


def test_sweep_cell_equals_truncate(random_dir):
    """A cell built from sliced factors scores like truncate_ at that rank (exact SVD)."""
    config = sweep.SweepConfig(model=str(random_dir), layers=[1], matrices=["mlp_out"], ranks=[5, 0.25], n=10)
    rev = sweep.run(config).revisions[0]
    for cell in rev.cells:
        direct = pythia.run(
            pythia.PythiaConfig(model=str(random_dir), layers=[1], matrices=["mlp_out"], rank=cell.rank, n=10)
        )
        whole = direct.revisions[0].truncated.mean_p_correct
        sel, rep = cell.select["ioi"], cell.report["ioi"]
        combined = (sel.mean_p_correct * sel.n + rep.mean_p_correct * rep.n) / (sel.n + rep.n)
        assert combined == pytest.approx(whole, rel=1e-4)


def test_sweep_bad_config(random_dir):
    with pytest.raises(ValueError, match="rank 1.5"):
        sweep.run(sweep.SweepConfig(model=str(random_dir), ranks=[1.5]))
    with pytest.raises(ValueError, match="select_fraction"):
        sweep.run(sweep.SweepConfig(model=str(random_dir), select_fraction=1.0))
    with pytest.raises(ValueError, match="exceeds the maximum rank 32"):
        sweep.run(sweep.SweepConfig(model=str(random_dir), ranks=[40], n=4))


# --- CLI ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "1.5"], "rank 1.5"),
        (["--rank", "abc"], "rank 'abc'"),
        (["--task", "poetry"], "task 'poetry'"),
        (["--matrix", "mlp_middle"], "matrix 'mlp_middle'"),
        (["--layer", "x"], "layer 'x'"),
        (["--layer", "7"], "layer 7 is out of range"),
        (["--n", "0"], "n 0"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--dtype", "int8"], "dtype 'int8'"),
        (["--revision", "step1", "--revisions", "step1,step2"], "not both"),
    ],
)
def test_run_pythia_bad_options_exit_2(random_dir, extra, message):
    args = ["run", "pythia", "--model", str(random_dir), "--layer", "0", "--matrix", "mlp_in", "--rank", "0.1"]
    # later occurrences of an option override earlier ones
    result = invoke(args + extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_sweep_pythia_bad_options_exit_2(random_dir):
    for extra, message in [
        (["--ranks", "0.5,,0.1"], "ranks"),
        (["--layers", "3-1"], "layer '3-1'"),
        (["--select-by", "vibes"], "select_by 'vibes'"),
    ]:
        result = invoke(["sweep", "pythia", "--model", str(random_dir)] + extra)
        assert result.exit_code == 2, result.output
        assert message in result.output


def test_make_tiny_neox_refuses_to_overwrite(random_dir):
    result = invoke(["make-tiny-neox", str(random_dir)])
    assert result.exit_code == 2 and "--overwrite" in result.output


# --- the tiny trained model: the paper's effect, end to end -----------------------------------------


@pytest.mark.parametrize("matrix", ["mlp_in", "mlp_out"])
def test_truncating_the_last_mlp_raises_the_io_to_the_ratio(trained_dir, matrix):
    result = invoke(
        [
            "run",
            "pythia",
            "--model",
            str(trained_dir),
            "--layer",
            "-1",
            "--matrix",
            matrix,
            "--rank",
            "0",
            "--n",
            "200",
            "--seed",
            "1",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rev = data["revisions"][0]
    base, cut = rev["baseline"], rev["truncated"]
    assert base["logit_diff_accuracy"] > 0.9  # the model has learned the in-context task
    assert base["mean_p_the"] > 0.1  # and " the" competes with the answer
    assert rev["gain_mean_of_ratios"] >= 2.0, rev
    assert cut["mean_p_the"] < 0.8 * base["mean_p_the"]  # measured 0.24x (mlp_in) and 0.17x (mlp_out)
    assert data["environment"]["torch"] == torch.__version__


def test_run_pythia_along_all_revisions_prints_and_plots_each_checkpoint(trained_dir, tmp_path):
    out = tmp_path / "all"
    args = ["run", "pythia", "--model", str(trained_dir), "--revisions", "all", "--layer=-1", "--matrix", "mlp_out"]
    result = invoke(args + ["--rank", "0", "--n", "40", "--task", "factual", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "factual along training" in result.output and "step1500" in result.output
    data = (out / "results.json").read_text()
    revisions = [r["revision"] for r in json.loads(data)["revisions"]]
    assert revisions == ["step1500", "step3000"]  # every saved checkpoint, in training order
    assert (out / "pythia_factual_checkpoints.png").read_bytes()[:4] == b"\x89PNG"


def test_run_and_sweep_along_revisions_write_plots(trained_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        [
            "run",
            "pythia",
            "--model",
            str(trained_dir),
            "--revisions",
            "step1500",
            "--layer",
            "-1",
            "--matrix",
            "mlp_in,mlp_out",
            "--rank",
            "0.05",
            "--n",
            "40",
            "--out",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file() and (out / "pythia_ioi.png").is_file()
    assert "ratio of means" in result.output
    out = tmp_path / "sweep"
    result = invoke(
        [
            "sweep",
            "pythia",
            "--model",
            str(trained_dir),
            "--revisions",
            "step1500,step3000",
            "--layers",
            "0-1",
            "--ranks",
            "0.5,0.1,0",
            "--n",
            "40",
            "--out",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [r["revision"] for r in data["revisions"]] == ["step1500", "step3000"]
    assert len(data["revisions"][0]["cells"]) == 2 * 2 * 3
    for name in ("sweep_ioi_step1500.png", "sweep_ioi_step3000.png", "sweep_ioi_checkpoints.png"):
        assert (out / name).is_file()


def test_sweep_benchmark_runs_on_a_small_model():
    """The GPU benchmark's code path, at a size the CPU runs in a second (timings meaningless here)."""
    from fasttrunc.bench.sweep import SweepBenchConfig, run

    config = SweepBenchConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        vocab_size=300,
        ranks=(0.5, 0.1),
        n_prompts=6,
        prompt_len=5,
        batch_size=3,
        dtype="float32",
        device="cpu",
    )
    result = run(config)
    assert result.cells == 2 * 2 * 2
    assert result.fasttrunc_seconds > 0 and result.laser_seconds > 0
    # exact vs LASER's randomized SVD (niter=2) of the same cells: close, not equal
    assert result.max_abs_diff_p_correct < 0.01


def test_tiny_corpus_never_contains_an_evaluation_prompt():
    """IOI sentences of the corpus use their own places and objects, so evaluation prompts are held out."""
    import random

    from fasttrunc.tasks import ioi

    assert not set(tiny_neox.TRAIN_PLACES) & set(ioi.PLACES) and not set(tiny_neox.TRAIN_OBJECTS) & set(ioi.OBJECTS)
    config = tiny_neox.TinyNeoxConfig()
    rng = random.Random(0)
    sentences = [tiny_neox.corpus_sentence(rng, config) for _ in range(3000)]
    ioi_like = [s for s in sentences if " and " in s]
    assert 0.27 < len(ioi_like) / len(sentences) < 0.36  # ioi_fraction 0.3125
    noisy = [s for s in ioi_like if any(s.endswith(f" to the {noun} .") for noun in tiny_neox.NOUNS)]
    assert 0.43 < len(noisy) / len(ioi_like) < 0.57  # noise 0.5: "to the <noun>" instead of the IO
    infinitive = [s for s in sentences if any(s.endswith(f" to {verb} .") for verb in tiny_neox.VERBS)]
    assert 0.33 < len(infinitive) / len(sentences) < 0.42  # infinitive 0.375
    evaluation_words = set(ioi.PLACES) | set(ioi.OBJECTS)
    assert not any(evaluation_words & set(s.replace(",", " ").replace(".", " ").split()) for s in ioi_like)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(steps=0), "steps 0"),
        (dict(seed=-1), "seed -1"),
        (dict(hidden_size=30, num_heads=4), "hidden_size 30 is not a multiple of num_heads 4"),
        (dict(noise=1.5), "noise 1.5"),
        (dict(ioi_fraction=0.7, infinitive=0.5), "exceeds 1"),
        (dict(lr=0.0), "lr 0.0"),
        (dict(weight_decay=-0.1), "weight_decay -0.1"),
        (dict(steps=10, checkpoints=(5, 11)), "checkpoint step 11"),
        (dict(names=("Mary",)), "at least 2"),
        (dict(names=()), "names is empty"),
    ],
)
def test_tiny_neox_config_validates_itself(kwargs, words):
    with pytest.raises(ValueError) as err:
        tiny_neox.TinyNeoxConfig(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_tiny_neox_config_is_frozen_and_canonical():
    config = tiny_neox.TinyNeoxConfig(steps=10, checkpoints=[5, 10], names=["Mary", "John"])
    assert config.checkpoints == (5, 10) and config.names == ("Mary", "John")
    with pytest.raises(AttributeError):
        config.steps = 3  # type: ignore[misc]
    tok = tiny_neox.build_tiny_tokenizer(config.names)
    assert tok.encode(" John", add_special_tokens=False) == [tok.convert_tokens_to_ids("John")]
    assert set(tiny_neox.tiny_vocabulary(config.names)) >= {"Mary", "John", "to", "the", "<|endoftext|>"}


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: pythia.PythiaConfig(model=d, layers=[], matrices=["mlp_in"], rank=0), "layers is empty"),
        (lambda d: pythia.PythiaConfig(model=d, layers=[0], matrices=["mlp_in"], rank=0, n=0), "n 0"),
        (lambda d: pythia.PythiaConfig(model=d, layers=[0], matrices=["x"], rank=0), "matrix 'x'"),
        (lambda d: sweep.SweepConfig(model=d, tasks=()), "tasks is empty"),
        (lambda d: sweep.SweepConfig(model=d, select_by="mean_logit_diff", tasks=["factual"]), "only the ioi"),
        (lambda d: sweep.SweepConfig(model=d, revisions=()), "revisions is empty"),
    ],
)
def test_pythia_configs_validate_on_construction(make, words):
    with pytest.raises(ValueError) as err:
        make("some/local/dir")  # no model is loaded: construction alone checks
    assert words in str(err.value) and "\n" not in str(err.value)
