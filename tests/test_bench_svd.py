"""The rSVD benchmark's config checks (its tiny-set run is part of benchmarks/gpu_check.sh --dry-run)."""

from __future__ import annotations

import pytest

from fasttrunc.bench.svd import SvdBenchConfig


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"sets": ("pythia-70m",)}, r"matrix set 'pythia-70m' is not known; allowed: pythia-1\.4b-mlp"),
        ({"ranks": (0,)}, r"rank 0 is out of range; allowed: an integer in \[1, 1024\]"),
        ({"ranks": ()}, r"ranks is empty"),
        ({"reps": 0}, r"reps 0 is out of range"),
        ({"reps": 2.5}, r"reps 2\.5 is not an integer"),
    ],
)
def test_svd_bench_config_rejects_bad_values(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        SvdBenchConfig(**change)


def test_svd_bench_config_is_frozen():
    config = SvdBenchConfig(sets=("tiny",), ranks=(3,))
    with pytest.raises(AttributeError):
        config.reps = 5  # type: ignore[misc]


def test_graph_replay_row_captures_once_and_replays(monkeypatch):
    """The CUDA-graph row's own logic on the CPU: CUDA's graph API stubbed so that a "replay"
    reruns the captured call into the same outputs; it captures once, checks the flags after a
    replay and refuses a flagged matrix."""
    import contextlib

    import torch

    import fasttrunc.bench.svd as bench
    import fasttrunc.kernels.svd as svd_module

    calls = []

    def fake_ex(ws, ks, **kwargs):
        calls.append(len(ws))
        return [(w[..., :2], w[:, 0, :2], w[..., :2, :], torch.zeros(w.shape[0], dtype=torch.int32)) for w in ws]

    class Graph:
        def replay(self):
            calls.append("replay")

    class Stream:
        def wait_stream(self, other):
            return None

    monkeypatch.setattr(svd_module, "randomized_svd_triton_many_ex", fake_ex)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None: contextlib.nullcontext())
    w = torch.randn(2, 5, 4)
    replay = bench._graph_replay([w], 2, {"n_iter": 2, "oversample": 1})
    assert calls == [1, 1, 1, "replay"]  # compile, warm up on the side stream, capture, checked replay
    ((u, s, vh),) = replay()
    assert calls[-1] == "replay" and u.shape == (2, 5, 2) and vh.shape == (2, 2, 4)

    def flagged_ex(ws, ks, **kwargs):
        return [(w, w, w, torch.ones(w.shape[0], dtype=torch.int32)) for w in ws]

    monkeypatch.setattr(svd_module, "randomized_svd_triton_many_ex", flagged_ex)
    with pytest.raises(RuntimeError, match="^2 matrices flagged after a CUDA graph replay of the rSVD$"):
        bench._graph_replay([w], 2, {"n_iter": 2, "oversample": 1})


def test_rsvd_cost_model_counts_the_algorithm_it_estimates():
    """The estimate's stages follow the algorithm: 2 + 2 n_iter passes, more iterations cost more,
    the device-side skip of settled CholeskyQR steps is credited, and the stages sum to the total."""
    import fasttrunc.bench.svd as bench

    shapes = [(24, 8192, 2048)]
    est = {n_iter: bench.estimate_rsvd_ms(shapes, 256, n_iter, 10) for n_iter in (0, 1, 2, 6)}
    for e in est.values():
        assert abs(sum(v for name, v in e.items() if name != "total") - e["total"]) < 1e-9
    one_iteration = est[2]["passes"] - est[1]["passes"]  # a W^T Q and a W Z in tf32, one moved to 3xTF32
    assert one_iteration > 0 and est[6]["total"] > est[2]["total"] > est[1]["total"]
    tf32 = bench._bmm_ms(24, 8192, 2048, 266, 4, "tf32")
    assert bench._bmm_ms(24, 8192, 2048, 266, 4, "tf32x3") > tf32  # three products (compute-bound)
    assert bench._bmm_ms(24, 8192, 2048, 266, 2, "tf32") < tf32  # bf16 weights read half the bytes
    skipped = est[2]["cholesky_qr"]
    no_skips = {**bench.RSVD_MODEL, "loose_work_steps": 2, "strict_work_steps": 3}
    assert bench.estimate_rsvd_ms(shapes, 256, 2, 10, model=no_skips)["cholesky_qr"] > skipped


def test_rsvd_cost_model_credits_fp16_weights():
    """fp16 weights (itemsize 2) read half the bytes, steer the range in fp16 MMAs (twice the tf32
    rate) and take 2xTF32 instead of 3xTF32 for the last two passes: their passes cost less."""
    import fasttrunc.bench.svd as bench

    shapes = bench.MATRIX_SETS["pythia-1.4b-mlp"]
    for n_iter, oversample in ((2, 10), (6, 32)):
        fp32 = bench.estimate_rsvd_ms(shapes, 256, n_iter, oversample)
        fp16 = bench.estimate_rsvd_ms(shapes, 256, n_iter, oversample, itemsize=2)
        assert fp16["passes"] < fp32["passes"]
        assert fp16["cholesky_qr"] == fp32["cholesky_qr"]  # the bases are fp32 either way
    assert bench._bmm_ms(24, 8192, 2048, 266, 2, "fp16") < bench._bmm_ms(24, 8192, 2048, 266, 2, "tf32")
    assert bench._bmm_ms(24, 8192, 2048, 266, 2, "tf32x2") < bench._bmm_ms(24, 8192, 2048, 266, 2, "tf32x3")
