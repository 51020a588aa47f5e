"""Associative memory: the model, the experiment's measurements and outcome, the CLI."""

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fasttrunc.experiments.memory import METRICS, MemoryConfig, noise_components, run, variants
from fasttrunc.models.memory import AssociativeMemory, prediction_metrics

# Small seeded runs: d > N so every clean association fits; 300 SGD steps of batch 4 (1200 pairs,
# ~19 per input) store the clean map and let the noise grow.
SMALL = dict(d=48, n_tokens=32, steps=300, batch_size=4, record_every=10, ks=(1, 2), top_components=4)


@pytest.fixture(scope="module")
def sgd_result():
    return run(MemoryConfig(alpha=0.3, seed=1, **SMALL))


@pytest.fixture(scope="module")
def noisy_result():
    """alpha > 1/2: the noise token is W's top prediction; the truncation must bring f(x) back."""
    return run(MemoryConfig(alpha=0.6, seed=2, **SMALL))


# --- the model ---------------------------------------------------------------------------------


def test_model_embeddings_data_and_metrics():
    model = AssociativeMemory(16, 10, torch.Generator().manual_seed(0))
    assert model.inputs.shape == (10, 16) and model.outputs.shape == (11, 16)
    assert torch.allclose(model.inputs.norm(dim=1), torch.ones(10))
    assert sorted(model.clean_map.tolist()) == list(range(10))
    assert not model.memory.weight.any()  # trained from W = 0
    g = torch.Generator().manual_seed(1)
    x, y = model.sample(4000, 0.25, g)
    noisy = y == model.noise_token
    assert abs(noisy.float().mean().item() - 0.25) < 0.03
    assert torch.equal(y[~noisy], model.clean_map[x[~noisy]])
    q = model.target_distribution(0.25)
    assert torch.allclose(q.sum(dim=1), torch.ones(10))
    # W = 0: every output equally likely; a W storing f exactly: accuracy 1.
    m0 = prediction_metrics(model)
    assert m0.p_noise == pytest.approx(1 / 11) and m0.p_clean == pytest.approx(1 / 11)
    # A W with u_f(x) . W e_x = 50 for every x and the other clean logits 0.
    w = 50 * torch.linalg.pinv(model.outputs[model.clean_map]) @ torch.linalg.pinv(model.inputs.T)
    m1 = prediction_metrics(model, w)
    assert m1.accuracy == 1.0 and m1.association_accuracy == 1.0 and m1.p_noise < 0.01


def test_noise_share_is_an_exact_split_of_the_mean_noise_margin():
    model = AssociativeMemory(12, 9, torch.Generator().manual_seed(3))
    w = torch.randn(12, 12)
    u, s, vh = torch.linalg.svd(w)
    share, alignment = noise_components(model, u, s, vh)
    assert sum(share) == pytest.approx(1.0, abs=1e-4)
    c, mu = model.noise_direction()
    parts = [sh * float(c @ w @ mu) for sh in share]
    expect = [float(s[i] * (c @ u[:, i]) * (vh[i] @ mu)) for i in range(12)]
    assert parts == pytest.approx(expect, rel=1e-3, abs=1e-6)
    assert all(0 <= a <= 1 + 1e-6 for a in alignment)
    # The noise direction itself: one component, all of the margin, alignment 1.
    w = torch.outer(c, mu)
    u, s, vh = torch.linalg.svd(w)
    share, alignment = noise_components(model, u, s, vh)
    assert share[0] == pytest.approx(1.0, abs=1e-4) and alignment[0] == pytest.approx(1.0, abs=1e-4)
    share, _ = noise_components(model, u, torch.zeros(12), vh)  # W = 0: no margin to split
    assert all(math.isnan(v) for v in share)


# --- bookkeeping -------------------------------------------------------------------------------


def test_shapes_and_step_axis(sgd_result):
    r, cfg = sgd_result, sgd_result.config
    n = len(r.steps)
    assert r.steps == list(range(0, cfg.steps + 1, cfg.record_every))
    assert all(a < b for a, b in zip(r.steps, r.steps[1:]))
    assert r.samples == [t * cfg.batch_size for t in r.steps]
    assert len(r.losses) == cfg.steps
    assert len(r.singular_values) == len(r.noise_share) == len(r.noise_alignment) == n
    assert all(len(row) == cfg.d for row in r.singular_values)
    assert all(all(a >= b - 1e-5 for a, b in zip(row, row[1:])) for row in r.singular_values)
    assert all(len(row) == cfg.top_components for row in r.noise_share + r.noise_alignment)
    assert (
        set(r.metrics) == set(variants(cfg.ks)) == {"full", "remove_top_1", "remove_top_2", "keep_top_1", "keep_top_2"}
    )
    for per in r.metrics.values():
        series = dataclasses.asdict(per)
        assert set(series) == set(METRICS) and all(len(v) == n for v in series.values())
    assert r.singular_values[0] == [0.0] * cfg.d  # W = 0 at step 0


def test_json_schema(sgd_result):
    data = json.loads(json.dumps(sgd_result.to_dict()))
    for key in (
        "config",
        "steps",
        "samples",
        "losses",
        "singular_values",
        "noise_share",
        "noise_alignment",
        "metrics",
        "summary",
        "environment",
    ):
        assert key in data
    assert data["config"]["alpha"] == 0.3 and data["config"]["ks"] == [1, 2]
    assert data["noise_share"][0] == [None] * 4  # undefined at W = 0, written as null
    s = data["summary"]
    for key in (
        "noise_component",
        "noise_share_final",
        "step_noise_on_top",
        "samples_association_90",
        "final",
        "restoring_truncation",
    ):
        assert key in s
    assert set(s["final"]) == set(data["metrics"])


def test_full_batch_has_no_sample_axis():
    r = run(MemoryConfig(d=24, n_tokens=16, steps=5, record_every=2, full_batch=True, ks=(1,), top_components=2))
    assert r.steps == [0, 2, 4, 5] and r.samples is None
    samples = {k: v for k, v in dataclasses.asdict(r.summary).items() if k.startswith("samples_")}
    assert samples and all(v is None for v in samples.values())  # no sample axis


def test_run_restores_thread_count(monkeypatch):
    import fasttrunc.experiments.memory as memory

    torch.set_num_threads(2)  # so that "1 during the run" differs from the count before it
    before = torch.get_num_threads()
    during: list[int] = []
    real_train = memory.train

    def train_counting_threads(*args, **kwargs):
        during.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(memory, "train", train_counting_threads)
    try:
        run(MemoryConfig(d=8, n_tokens=4, steps=2, record_every=1, ks=(1,), top_components=2))
        assert during == [1]  # the run trained single-threaded
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


# --- the measured effects ----------------------------------------------------------------------


def test_full_batch_first_step_puts_the_noise_in_the_top_component():
    # One exact gradient step from W = 0: the noise term alpha u_noise mu^T is rank one and serves
    # every input, so it is the top singular component, carries the noise margin, and its lead
    # over the clean values grows with alpha (alpha sqrt(N) / (1 - alpha) for orthonormal embeddings).
    gaps = {}
    for alpha in (0.2, 0.5):
        r = run(MemoryConfig(d=64, n_tokens=32, alpha=alpha, steps=1, record_every=1, full_batch=True, ks=(1,)))
        s = r.singular_values[1]
        gaps[alpha] = s[0] / s[1]
    assert r.noise_share[1][0] > 0.9 and r.noise_alignment[1][0] > 0.8
    assert gaps[0.5] > 1.5 and gaps[0.5] > gaps[0.2] + 0.5


def test_noise_lives_in_the_top_component(sgd_result):
    s = sgd_result.summary
    assert s.noise_component == 1
    assert s.noise_share_final > 0.9
    assert max(abs(v) for v in sgd_result.noise_share[-1][1:]) < 0.1
    assert s.singular_gap_final > 1.5


def test_noise_direction_forms_before_the_clean_map_is_stored(sgd_result, noisy_result):
    for r in (sgd_result, noisy_result):
        s = r.summary
        assert s.step_noise_on_top_first is not None and s.step_association_90 is not None
        assert s.step_noise_on_top_first < s.step_association_90


def test_removing_the_top_component_restores_the_clean_map(noisy_result):
    final = noisy_result.summary.final
    full, removed, kept = final["full"], final["remove_top_1"], final["keep_top_1"]
    assert full.p_noise > 0.4 and full.accuracy < 0.5  # the noise wins on clean data
    assert removed.p_noise < 0.1 * full.p_noise
    assert removed.accuracy > 0.95 and removed.p_clean > full.p_clean
    assert kept.accuracy < 0.1 and kept.p_noise > full.p_noise  # a low-rank W keeps the noise
    assert noisy_result.summary.restoring_truncation == "remove_top_1"


def test_removal_lowers_p_noise_at_low_alpha_too(sgd_result):
    final = sgd_result.summary.final
    assert final["remove_top_1"].p_noise < 0.5 * final["full"].p_noise
    assert final["remove_top_1"].p_clean > final["full"].p_clean
    assert final["remove_top_1"].accuracy >= final["full"].accuracy


def test_shared_input_direction_makes_the_noise_global_and_early():
    # With a direction common to all inputs, the noise association reaches every input at once:
    # P(noise) rises before half the clean associations are stored, W predicts the noise token
    # almost everywhere early on, and removing its top component then restores the clean map.
    shared = run(MemoryConfig(alpha=0.3, shared=0.3, seed=1, **SMALL))
    plain = run(MemoryConfig(alpha=0.3, shared=0.0, seed=1, **SMALL))
    s = shared.summary
    assert s.samples_p_noise_half < s.samples_association_half
    assert s.samples_p_noise_half < plain.summary.samples_p_noise_half
    i = shared.steps.index(50)
    assert shared.metrics["full"].accuracy[i] < 0.1
    assert shared.metrics["remove_top_1"].accuracy[i] > 0.5
    assert shared.noise_share[i][0] > 0.9


@pytest.mark.gpu
def test_cuda_run_matches_cpu_run():
    # Embeddings and pairs come from the same CPU generator, so both devices train on the same data.
    cfg = dict(d=32, n_tokens=16, steps=40, record_every=10, ks=(1,), top_components=2)
    gpu = run(MemoryConfig(device="cuda", **cfg))
    cpu = run(MemoryConfig(device="cpu", **cfg))
    assert gpu.steps == cpu.steps
    assert gpu.singular_values[-1][:4] == pytest.approx(cpu.singular_values[-1][:4], rel=1e-3)
    assert gpu.metrics["full"].p_noise == pytest.approx(cpu.metrics["full"].p_noise, rel=1e-3)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"d": 1}, "d 1"),
        ({"n_tokens": 1}, "n_tokens 1"),
        ({"alpha": 0.0}, "alpha 0.0"),
        ({"alpha": 1.0}, "alpha 1.0"),
        ({"alpha": float("nan")}, "alpha nan"),
        ({"lr": 0.0}, "lr 0.0"),
        ({"lr": float("inf")}, "lr inf"),
        ({"steps": 0}, "steps 0"),
        ({"batch_size": 0}, "batch_size 0"),
        ({"record_every": 5000}, "record_every 5000"),
        ({"seed": -1}, "seed -1"),
        ({"ks": (128,)}, "k 128"),
        ({"ks": (2, 1)}, "strictly increasing"),
        ({"top_components": 0}, "top_components 0"),
        ({"d": 2.5}, "d 2.5"),
        ({"shared": 1.0}, "shared 1.0"),
    ],
)
def test_bad_config_is_a_one_line_value_error(kwargs, words):
    with pytest.raises(ValueError) as err:
        MemoryConfig(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


# --- CLI ---------------------------------------------------------------------------------------

CLI_SMALL = ["run", "memory", "--d", "24", "--n-tokens", "16", "--steps", "40", "--record-every", "10"]


def _app():
    from fasttrunc.cli.main import app

    return app


def test_cli_json_and_out(tmp_path):
    runner = CliRunner()
    res = runner.invoke(_app(), CLI_SMALL + ["--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["steps"] == [0, 10, 20, 30, 40] and data["config"]["d"] == 24
    res = runner.invoke(_app(), CLI_SMALL + ["--full-batch", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "remove_top_1" in res.stdout
    assert json.loads((tmp_path / "results.json").read_text())["config"]["full_batch"] is True
    for name in ("memory_dynamics.png", "memory_truncation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--alpha", "1.5"], "alpha 1.5"),
        (["--d", "1"], "d 1"),
        (["--shared", "-0.5"], "shared -0.5"),
        (["--steps", "0"], "steps 0"),
        (["--lr", "-1"], "lr -1.0"),
        (["--record-every", "100"], "record_every 100"),
        (["--device", "tpu"], "tpu"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(args, words):
    res = CliRunner().invoke(_app(), CLI_SMALL + args)
    assert res.exit_code == 2
    assert "Traceback" not in res.output and words in res.output
    assert len(res.output.strip().splitlines()) == 1
