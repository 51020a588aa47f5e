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
