"""The backend rule (kernels/_backend.py): read from the environment at every call, cheaply."""

from __future__ import annotations

import os

import pytest

from fasttrunc.kernels import _backend


def test_each_call_sees_the_environment_as_it_is_now(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")
    assert _backend.use_triton_on("cpu") is False
    monkeypatch.setenv("FASTTRUNC_BACKEND", "triton")
    assert _backend.use_triton_on("cpu") is (_backend._triton_installed())
    monkeypatch.delenv("FASTTRUNC_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.use_triton_on("cpu") is False
    os.environ["FASTTRUNC_BACKEND"] = ""  # set and empty: unset
    assert _backend.use_triton_on("cpu") is False
    assert _backend.use_triton_on("cuda") is _backend._triton_installed()


def test_a_bad_backend_is_named(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"FASTTRUNC_BACKEND='cuda' is not a backend; allowed: torch, triton"):
        _backend.use_triton_on("cpu")


def test_a_replaced_environ_mapping_is_read_the_plain_way(monkeypatch):
    """If os.environ is swapped for another mapping, its values still decide."""
    monkeypatch.setattr(os, "environ", {"FASTTRUNC_BACKEND": "torch", "TRITON_INTERPRET": "1"})
    assert _backend._environment() == ("torch", "1")
    assert _backend.use_triton_on("cpu") is False
    os.environ["FASTTRUNC_BACKEND"] = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        _backend.use_triton_on("cpu")


@pytest.mark.skipif(os.name != "posix", reason="the bytes mapping is POSIX's")
def test_the_fast_read_agrees_with_os_environ(monkeypatch):
    for value in ("triton", "torch", " Torch ", "é"):
        monkeypatch.setenv("FASTTRUNC_BACKEND", value)
        raw, _ = _backend._environment()
        assert _backend._text(raw, "") == os.environ["FASTTRUNC_BACKEND"]
    monkeypatch.delenv("FASTTRUNC_BACKEND")
    assert _backend._environment()[0] is None
