"""benchmarks/family_survey.py: every causal-LM type of transformers read as fasttrunc reads it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("family_survey", ROOT / "benchmarks" / "family_survey.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_survey_reads_a_row_a_mixture_of_experts_a_hybrid_and_a_refused_type(capsys):
    module = _module()
    records = module.survey(["llama", "qwen2_moe", "lfm2", "mamba"])
    assert records["llama"]["status"] == "row" and records["llama"]["targets"] == 14
    assert records["llama"]["full_rank_error"] < 1e-5
    assert records["qwen2_moe"]["status"] == "attention only" and records["qwen2_moe"]["targets"] == 8
    assert (
        records["lfm2"]["status"] == "per layer" and records["lfm2"]["targets"] == 3 + 7
    )  # the MLP, then the MLP and the attention
    assert records["lfm2"]["full_rank_error"] < 1e-5
    assert records["mamba"]["status"] == "no family" and "cannot be read by module names" in records["mamba"]["reason"]
    assert module.main(["--types", "llama"]) == 0
    assert "summary: row 1 of 1" in capsys.readouterr().out


def test_survey_refuses_unknown_types():
    with pytest.raises(ValueError, match=r"model types \['not_a_type'\] are not causal-LM types"):
        _module().survey(["not_a_type"])
