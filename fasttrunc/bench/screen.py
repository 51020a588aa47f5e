"""How well the screened search finds the exhaustive sweep's best cell, on models built here.

``study(kind, seed)`` builds a tiny GPT-NeoX (``"trained"``: the make_tiny_neox recipe with 6
layers, 600 steps and no weight decay, cached under ``directory``; ``"random"``: random weights,
d 64, 6 layers; ``"random-llama"``, ``"random-gpt2"``: random Llama and GPT-2 of that size),
sweeps 6 layers x 4 matrices x 18 ranks = 432 cells on 100 IOI prompts (30% select) both
exhaustively and screened, and reports the exact evaluations, whether the best cell is the same,
the regret in the selection metric, and where the screened pick ranks among all cells.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fasttrunc.experiments import sweep
from fasttrunc.experiments.pythia import task_prompts
from fasttrunc.selection import metric_value
from fasttrunc.tasks.metrics import encode_prompts

STUDY_RANKS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.075, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0)
STUDY_MATRICES = ("mlp_in", "mlp_out", "attn_qkv", "attn_out")


def _random_llama(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _random_gpt2(vocab: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=6, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


# Random-weight models of other families, on the tiny tokenizer's vocabulary.
RANDOM_FAMILIES = {"random-llama": _random_llama, "random-gpt2": _random_gpt2}
STUDY_KINDS = ("trained", "random", *RANDOM_FAMILIES)


def _model(kind: str, seed: int, directory: Path) -> tuple[Any, Any, str]:
    from fasttrunc.models import tiny_neox

    if kind == "random":
        config = tiny_neox.TinyNeoxConfig(hidden_size=64, num_layers=6, intermediate_size=256)
        tok = tiny_neox.build_tiny_tokenizer(config.names)
        torch.manual_seed(seed)
        model = tiny_neox.tiny_neox_model(len(tok), config, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        return model, tok, f"random GPT-NeoX d64 L6 seed {seed}"
    if kind in RANDOM_FAMILIES:
        tok = tiny_neox.build_tiny_tokenizer(tiny_neox.TinyNeoxConfig().names)
        torch.manual_seed(seed)
        return RANDOM_FAMILIES[kind](len(tok)).eval(), tok, f"{kind} d64 L6 seed {seed}"
    if kind != "trained":
        raise ValueError(f"study model {kind!r} is not known; allowed: {', '.join(STUDY_KINDS)}")
    from fasttrunc.hub import load_model

    path = Path(directory) / f"trained-seed{seed}"
    if not (path / "config.json").exists():
        # weight_decay 0.0: the recipe as it was when the README's screening table was measured
        config = tiny_neox.TinyNeoxConfig(seed=seed, steps=600, num_layers=6, weight_decay=0.0)
        tiny_neox.make_tiny_neox(path, config)
    model, tok = load_model(str(path), None, "float32", torch.device("cpu"))
    return model, tok, f"trained tiny GPT-NeoX L6, 600 steps, seed {seed}"


def study(kind: str, seed: int, directory: Path, keep: int | None = None) -> dict[str, Any]:
    model, tok, name = _model(kind, seed, directory)
    model.eval()
    n = 100
    encoded = {"ioi": encode_prompts(tok, task_prompts("ioi", tok, n, 0))}
    splits = {"ioi": sweep._split(n, 0.3)}
    args = (model, encoded, splits, list(range(6)), STUDY_MATRICES, STUDY_RANKS)
    t0 = time.perf_counter()
    exhaustive = sweep.sweep_model(*args)
    t1 = time.perf_counter()
    screened = sweep.sweep_model(*args, search="screened", keep=keep)
    t2 = time.perf_counter()

    def value(cell: sweep.Cell) -> float:
        return metric_value(cell.select["ioi"], "mean_p_correct")

    exact = {(c.layer, c.matrix, c.rank): value(c) for c in exhaustive.cells}
    best = max(exhaustive.cells, key=value)
    pick = max((c for c in screened.cells if c.evaluated), key=value)
    picked = exact[(pick.layer, pick.matrix, pick.rank)]
    return {
        "model": name,
        "cells": len(exhaustive.cells),
        "evaluated": sum(c.evaluated for c in screened.cells),
        "same_best": (best.layer, best.matrix, best.rank) == (pick.layer, pick.matrix, pick.rank),
        "best": [best.layer, best.matrix, best.rank],
        "picked": [pick.layer, pick.matrix, pick.rank],
        "regret": value(best) - picked,
        "best_gain": value(best) - metric_value(exhaustive.baseline_select["ioi"], "mean_p_correct"),
        "picked_true_rank": sorted(exact.values(), reverse=True).index(picked) + 1,
        "exhaustive_seconds": t1 - t0,
        "screened_seconds": t2 - t1,
    }
