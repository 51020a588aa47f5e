"""Every family row on a tiny random model of its type, rows found by structure and by names, describe_targets.

Each row's model is built from its config class with tiny sizes (2 layers, hidden 32, vocab 64),
seeded, in fp32 and eval mode. The expected module names are written out here, not read from
the rows, so a wrong row fails.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import fasttrunc
from fasttrunc import Targets, TruncatedLinear, load_truncated, resolve_targets, save_truncated, truncate_
from fasttrunc.families import find_family

VOCAB = 64
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLAMA_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    **IDS,
}
MOE_SIZES = {**LLAMA_SIZES, "num_experts_per_tok": 2}

GATED = ("mlp_in", "mlp_up", "mlp_out", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out")
SEPARATE = ("mlp_in", "mlp_out", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out")
FUSED_QKV = ("mlp_in", "mlp_out", "attn_qkv", "attn_out")
ATTENTION_ONLY = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out")
LLAMA_LAST = (
    "model.layers.1.mlp.gate_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.k_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.self_attn.o_proj",
)
MOE_LAST = LLAMA_LAST[3:]
BLOOM_LAST = (
    "transformer.h.1.mlp.dense_h_to_4h",
    "transformer.h.1.mlp.dense_4h_to_h",
    "transformer.h.1.self_attention.query_key_value",
    "transformer.h.1.self_attention.dense",
)
QKV_PARTS = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv"}


@dataclass(frozen=True)
class Row:
    """What a family's tiny model must show: its row name, the last layer's names under "all"."""

    family: str
    config: dict
    last: tuple[str, ...]  # Targets(layers=[-1], matrices="all"), in order
    aliases: tuple[str, ...]
    fused: dict[str, str] = field(default_factory=dict)  # part alias -> the alias naming the whole
    mlp_out_bias: bool | None = False  # None: the MLP aliases are refused (fused 3-D experts)


def moe_row(family: str, **sizes: int) -> Row:
    """A mixture of experts kept as fused 3-D parameters: attention aliases only."""
    return Row(family, {**MOE_SIZES, **sizes}, MOE_LAST, ATTENTION_ONLY, mlp_out_bias=None)


ROWS: dict[str, Row] = {
    "gpt_neox": Row(
        "gpt-neox",
        {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            **IDS,
        },
        (
            "gpt_neox.layers.1.mlp.dense_h_to_4h",
            "gpt_neox.layers.1.mlp.dense_4h_to_h",
            "gpt_neox.layers.1.attention.query_key_value",
            "gpt_neox.layers.1.attention.dense",
        ),
        FUSED_QKV,
        QKV_PARTS,
        mlp_out_bias=True,
    ),
    "llama": Row("llama", LLAMA_SIZES, LLAMA_LAST, GATED),
    "mistral": Row("mistral", LLAMA_SIZES, LLAMA_LAST, GATED),
    "qwen2": Row("qwen2", LLAMA_SIZES, LLAMA_LAST, GATED),
    "qwen3": Row("qwen3", {**LLAMA_SIZES, "head_dim": 8}, LLAMA_LAST, GATED),
    "gemma": Row("gemma", {**LLAMA_SIZES, "head_dim": 8}, LLAMA_LAST, GATED),
    "gemma2": Row("gemma2", {**LLAMA_SIZES, "head_dim": 8}, LLAMA_LAST, GATED),
    "olmo": Row("olmo", LLAMA_SIZES, LLAMA_LAST, GATED),
    "olmo2": Row("olmo2", LLAMA_SIZES, LLAMA_LAST, GATED),
    "phi": Row(
        "phi",
        {k: v for k, v in LLAMA_SIZES.items() if k != "num_key_value_heads"},
        (
            "model.layers.1.mlp.fc1",
            "model.layers.1.mlp.fc2",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.v_proj",
            "model.layers.1.self_attn.dense",
        ),
        SEPARATE,
        mlp_out_bias=True,
    ),
    "phi3": Row(
        "phi3",
        LLAMA_SIZES,
        (
            "model.layers.1.mlp.gate_up_proj",
            "model.layers.1.mlp.down_proj",
            "model.layers.1.self_attn.qkv_proj",
            "model.layers.1.self_attn.o_proj",
        ),
        FUSED_QKV,
        {**QKV_PARTS, "mlp_up": "mlp_in"},
    ),
    "gpt2": Row(
        "gpt2",
        {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, **IDS},
        (
            "transformer.h.1.mlp.c_fc",
            "transformer.h.1.mlp.c_proj",
            "transformer.h.1.attn.c_attn",
            "transformer.h.1.attn.c_proj",
        ),
        FUSED_QKV,
        QKV_PARTS,
        mlp_out_bias=True,
    ),
    "gptj": Row(
        "gpt-j",
        {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4, **IDS},
        (
            "transformer.h.1.mlp.fc_in",
            "transformer.h.1.mlp.fc_out",
            "transformer.h.1.attn.q_proj",
            "transformer.h.1.attn.k_proj",
            "transformer.h.1.attn.v_proj",
            "transformer.h.1.attn.out_proj",
        ),
        SEPARATE,
        mlp_out_bias=True,
    ),
    "opt": Row(
        "opt",
        {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "ffn_dim": 48,
            "word_embed_proj_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            **IDS,
        },
        (
            "model.decoder.layers.1.fc1",
            "model.decoder.layers.1.fc2",
            "model.decoder.layers.1.self_attn.q_proj",
            "model.decoder.layers.1.self_attn.k_proj",
            "model.decoder.layers.1.self_attn.v_proj",
            "model.decoder.layers.1.self_attn.out_proj",
        ),
        SEPARATE,
        mlp_out_bias=True,
    ),
    "falcon": Row(
        "falcon",
        {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, **IDS},
        BLOOM_LAST,
        FUSED_QKV,
        QKV_PARTS,
    ),
    "bloom": Row(
        "bloom",
        {"vocab_size": VOCAB, "hidden_size": 32, "n_layer": 2, "n_head": 4, **IDS},
        BLOOM_LAST,
        FUSED_QKV,
        QKV_PARTS,
        mlp_out_bias=True,
    ),
    "mixtral": moe_row("mixtral", num_local_experts=4),
    "qwen2_moe": moe_row("qwen2-moe", num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    "qwen3_moe": moe_row("qwen3-moe", num_experts=4, moe_intermediate_size=16, head_dim=8),
}
TYPES = list(ROWS)
MLP_TYPES = [t for t in TYPES if ROWS[t].mlp_out_bias is not None]
MOE_TYPES = [t for t in TYPES if ROWS[t].mlp_out_bias is None]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTTRUNC_BACKEND", "torch")


def tiny_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **ROWS[model_type].config)


def tiny(model_type: str, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="eager")
    return model.float().eval()


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def greedy(model: Any, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0
        )


def assert_exact_at_full_rank(model: nn.Module, forward=logits) -> None:
    """Full-rank truncation of every aliased matrix keeps the outputs; leaving restores them bit for bit."""
    x = inputs()
    reference = forward(model, x)
    with truncate_(model, Targets(matrices="all"), 1.0):
        torch.testing.assert_close(forward(model, x), reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(forward(model, x), reference)


def no_truncated(model: nn.Module) -> bool:
    return not any(isinstance(m, TruncatedLinear) for m in model.modules())


# --- every row -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_last_layer_resolves_to_the_expected_names(model_type):
    row = ROWS[model_type]
    model = tiny(model_type)
    match = find_family(model)
    assert (match.family.name, match.matched_by, match.n_layers) == (row.family, "model_type", 2)
    assert resolve_targets(model, Targets(layers=[-1], matrices="all")) == list(row.last)
    assert match.family.aliases() == row.aliases
    for part, whole in row.fused.items():
        with pytest.raises(ValueError, match=f"{part!r} is part of a fused matrix in {row.family}; .* {whole!r}"):
            resolve_targets(model, Targets(layers=0, matrices=part))


@pytest.mark.parametrize("model_type", TYPES)
def test_full_rank_is_exact_and_restore_is_bit_identical(model_type):
    model = tiny(model_type)
    x, prompt = inputs(), inputs(2)[:1, :5]
    reference, tokens, before = logits(model, x), greedy(model, prompt), state_hash(model)
    truncation = truncate_(model, Targets(matrices="all"), 1.0, method="exact")
    assert len(truncation) == 2 * len(ROWS[model_type].last)
    torch.testing.assert_close(logits(model, x), reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(model, prompt), tokens)
    truncation.restore()
    assert no_truncated(model) and state_hash(model) == before
    assert torch.equal(logits(model, x), reference)


@pytest.mark.parametrize("model_type", TYPES)
def test_save_and_load_round_trip_exactly(model_type, tmp_path):
    model = tiny(model_type)
    x = inputs()
    truncate_(model, Targets(layers=-1, matrices="all"), 3)
    expected = logits(model, x)
    save_truncated(model, tmp_path)
    fresh = tiny(model_type, seed=7)  # other random weights: everything must come from the files
    assert not torch.equal(logits(fresh, x), expected)
    truncation = load_truncated(fresh, tmp_path)
    assert sorted(truncation) == sorted(ROWS[model_type].last)
    assert torch.equal(logits(fresh, x), expected)


@pytest.mark.parametrize("model_type", MLP_TYPES)
def test_rank_zero_mlp_out_leaves_only_the_bias(model_type):
    model = tiny(model_type)
    (name,) = resolve_targets(model, Targets(layers=-1, matrices="mlp_out"))
    original = model.get_submodule(name)
    bias = original.bias
    assert (bias is not None) == ROWS[model_type].mlp_out_bias
    truncate_(model, Targets(layers=-1, matrices="mlp_out"), 0)
    module = model.get_submodule(name)
    assert isinstance(module, TruncatedLinear) and module.rank == 0
    h = torch.randn(3, 5, module.in_features)
    expected = torch.zeros(3, 5, module.out_features) if bias is None else bias.detach().expand(3, 5, -1)
    with torch.no_grad():
        assert torch.equal(module(h), expected)
    assert torch.isfinite(logits(model, inputs())).all()  # the model still runs through the bias-only layer


@pytest.mark.parametrize("model_type", TYPES)
def test_merge_gives_a_plain_model_that_predicts_what_the_truncated_one_does(model_type):
    model = tiny(model_type)
    x = inputs()
    truncation = truncate_(model, Targets(layers=-1, matrices="all"), 4)
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(tiny(model_type), x), atol=1e-4)  # rank 4 changes something
    merged = truncation.merge_()
    assert merged is model and no_truncated(model)
    assert all(type(model.get_submodule(n)) is type(m) for n, m in truncation.originals.items())
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_bad_input_names_what_exists_and_changes_nothing(model_type):
    row = ROWS[model_type]
    model = tiny(model_type)
    before = state_hash(model)
    allowed = ", ".join(row.aliases + ("mlp", "attn", "all"))
    with pytest.raises(ValueError, match=re.escape(f"matrix 'ffn' is not known; allowed: {allowed}")):
        truncate_(model, Targets(layers=-1, matrices=["attn_out", "ffn"]), 0.5)
    with pytest.raises(ValueError, match=re.escape("layer 2 is out of range for a model with 2 layers; allowed: 0..1")):
        truncate_(model, Targets(layers=[0, 2], matrices="all"), 0.5)
    with pytest.raises(ValueError, match="layer -3 is out of range"):
        truncate_(model, Targets(layers=-3), 0.5)
    with pytest.raises(ValueError, match="rank 99 exceeds"):
        truncate_(model, Targets(layers=-1), 99)
    for part in row.fused:
        with pytest.raises(ValueError, match="is part of a fused matrix"):
            truncate_(model, Targets(matrices=["attn_out", part]), 0.5)
    assert no_truncated(model) and state_hash(model) == before


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_mixture_of_experts_truncates_attention_and_refuses_the_mlp_in_one_line(model_type):
    model = tiny(model_type)
    before = state_hash(model)
    for matrices in ("mlp_in", "mlp_up", "mlp_out", "mlp", ["attn_out", "mlp_out"]):
        with pytest.raises(ValueError) as info:
            truncate_(model, Targets(layers=-1, matrices=matrices), 0.5)
        message = str(info.value)
        assert "\n" not in message
        assert re.fullmatch(
            rf"matrix 'mlp_\w+' cannot be truncated in {ROWS[model_type].family}: its MLP is a mixture of experts "
            r"whose weights are fused 3-D parameters \(mlp\.experts\.gate_up_proj, mlp\.experts\.down_proj\).*",
            message,
        ), message
    assert no_truncated(model) and state_hash(model) == before
    with truncate_(model, Targets(layers=0, matrices="attn"), 2) as truncation:
        assert sorted(truncation) == sorted(n.replace(".1.", ".0.") for n in MOE_LAST)


# --- rows found by structure and by module names -------------------------------------------------


def test_a_renamed_llama_is_read_by_module_names():
    from transformers import LlamaConfig, LlamaForCausalLM

    class RenamedConfig(LlamaConfig):
        model_type = "my_renamed_llama"

    torch.manual_seed(0)
    model = LlamaForCausalLM(RenamedConfig(**LLAMA_SIZES)).eval()
    match = find_family(model)
    assert (match.family.name, match.matched_by, match.path) == ("my_renamed_llama", "module names", "model.layers")
    assert resolve_targets(model, Targets(layers=[-1], matrices="all")) == list(LLAMA_LAST)


BERT_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
    "is_decoder": True,
    **IDS,
}
BERT_LAST = (
    "roberta.encoder.layer.1.intermediate.dense",
    "roberta.encoder.layer.1.output.dense",
    "roberta.encoder.layer.1.attention.self.query",
    "roberta.encoder.layer.1.attention.self.key",
    "roberta.encoder.layer.1.attention.self.value",
    "roberta.encoder.layer.1.attention.output.dense",
)

BART_SIZES = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "decoder_layers": 2,
    "encoder_layers": 2,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_ffn_dim": 48,
    "encoder_ffn_dim": 48,
    "max_position_embeddings": 32,
    **IDS,
}
BART_LAST = ROWS["opt"].last  # OPT's decoder names: fc1, fc2 and self_attn's four projections

UNROWED = {
    "gemma3_text": ({**LLAMA_SIZES, "head_dim": 8}, LLAMA_LAST),
    "stablelm": (LLAMA_SIZES, LLAMA_LAST),
    "starcoder2": (
        LLAMA_SIZES,
        ("model.layers.1.mlp.c_fc", "model.layers.1.mlp.c_proj", *LLAMA_LAST[3:]),
    ),
    "gpt_bigcode": (ROWS["gpt2"].config, ROWS["gpt2"].last),  # GPT-2's names, in nn.Linear rather than Conv1D
    "olmoe": ({**MOE_SIZES, "num_experts": 4}, MOE_LAST),  # fused experts: attention only
    # BERT's layer, here RoBERTa's decoder (LASER truncated RoBERTa's intermediate.dense / output.dense)
    "roberta": (BERT_SIZES, BERT_LAST),
    # A seq2seq decoder: the aliases name its self-attention, its encoder_attn is left to regexes
    "bart": (BART_SIZES, BART_LAST),
}


@pytest.mark.parametrize("model_type", list(UNROWED))
def test_types_without_a_row_are_read_by_module_names(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes, last = UNROWED[model_type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes)).eval()
    match = find_family(model)
    assert (match.family.name, match.matched_by, match.n_layers) == (model_type, "module names", 2)
    assert resolve_targets(model, Targets(layers=[-1], matrices="all")) == list(last)
    assert bool(match.family.unsupported) == (model_type == "olmoe")
    assert_exact_at_full_rank(model)


# Hybrid models: one linear MLP per block after attention in some blocks and another token mixer
# (Mamba-2, a short convolution, an RG-LRU recurrence) in the others; layer 2 is the attention.
HYBRID_SIZES = {**LLAMA_SIZES, "num_hidden_layers": 4, "head_dim": 8}
HYBRIDS = {
    # model type: (sizes, the MLP module, its linears, the attention module, the linears of the other mixer)
    "bamba": (
        {**HYBRID_SIZES, "attn_layer_indices": [2], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8},
        "feed_forward",
        ("gate_proj", "up_proj", "down_proj"),
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        "mamba.in_proj, mamba.out_proj",
    ),
    "lfm2": (
        {**HYBRID_SIZES, "layer_types": ["conv", "conv", "full_attention", "conv"]},
        "feed_forward",
        ("w1", "w3", "w2"),
        ("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
        "conv.in_proj, conv.out_proj",
    ),
    "recurrent_gemma": (
        {**HYBRID_SIZES, "block_types": ["recurrent", "recurrent", "attention"], "lru_width": 32},
        "mlp_block",
        ("gate_proj", "up_proj", "down_proj"),
        ("temporal_block", ("q_proj", "k_proj", "v_proj", "o_proj")),
        "temporal_block.linear_y, temporal_block.linear_x, temporal_block.linear_out",
    ),
}


def hybrid_tiny(model_type: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **HYBRIDS[model_type][0])).float().eval()


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_hybrid_blocks_read_the_mlp_everywhere_and_the_attention_where_it_is(model_type):
    """One MLP in every block, attention in layer 2 and another token mixer in the others: the
    MLP aliases name every layer's MLP, the attention aliases layer 2's attention only."""
    _, mlp, names, (attn, attn_names), other = HYBRIDS[model_type]
    model = hybrid_tiny(model_type)
    match = find_family(model)
    assert (match.matched_by, match.n_layers, dict(match.family.unsupported)) == ("module names", 4, {})
    assert {alias: layers for alias, (layers, _) in match.family.only_in.items()} == dict.fromkeys(
        ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out"), (2,)
    )
    attention = [f"model.layers.2.{attn}.{name}" for name in attn_names]
    assert resolve_targets(model, Targets(layers=[1, 2], matrices="all")) == [
        *(f"model.layers.1.{mlp}.{name}" for name in names),
        *(f"model.layers.2.{mlp}.{name}" for name in names),
        *attention,
    ]
    assert resolve_targets(model, Targets(matrices="attn")) == attention  # every layer: where it is
    assert resolve_targets(model, Targets(layers=2, matrices="attn_q")) == attention[:1]
    before = state_hash(model)
    for targets in (Targets(matrices="attn_q"), Targets(layers=[2, 3], matrices="attn")):
        with pytest.raises(ValueError) as info:
            truncate_(model, targets, 0.5)
        message = str(info.value)
        assert "\n" not in message and f"of {model_type}, not in layer " in message, message
        assert f"is only in layer 2 of {model_type}" in message and f"layers 0, 1, 3 hold {other} instead" in message
        assert (
            "e.g. Targets(layers=[2], matrices=" in message
            and "on the command line --layer 2, in a sweep --layers 2" in message
        )
    assert no_truncated(model) and state_hash(model) == before
    assert_exact_at_full_rank(model)


def jamba_tiny() -> nn.Module:
    """4 layers: attention in layer 2, Mamba in the others; a dense MLP in layers 0 and 2, experts in 1 and 3."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {**HYBRID_SIZES, "attn_layer_period": 4, "attn_layer_offset": 2, "num_experts": 4}
    sizes |= {"expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 8, "mamba_dt_rank": 4}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("jamba", **sizes)).float().eval()


def test_jamba_reads_its_attention_and_dense_mlps_where_they_are():
    """Jamba: attention layers and Mamba layers are two classes in one list of blocks, and fused
    experts replace the MLP every other layer; each alias names the layers that hold it."""
    model = jamba_tiny()
    assert len({type(block) for block in model.model.layers}) == 2
    match = find_family(model)
    assert (match.matched_by, match.n_layers, dict(match.family.unsupported)) == ("module names", 4, {})
    only_in = {alias: layers for alias, (layers, _) in match.family.only_in.items()}
    assert only_in == {**dict.fromkeys(("mlp_in", "mlp_up", "mlp_out"), (0, 2)), **dict.fromkeys(GATED[3:], (2,))}
    mlp = [f"model.layers.{i}.feed_forward.{p}" for i in (0, 2) for p in ("gate_proj", "up_proj", "down_proj")]
    attention = [f"model.layers.2.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert resolve_targets(model, Targets(matrices="attn")) == attention
    assert resolve_targets(model, Targets(layers=[0, 2], matrices="all")) == [*mlp, *attention]
    with pytest.raises(
        ValueError, match=r"'mlp_in' is only in layers 0, 2 of jamba, not in layer 1 \(layers 1, 3 hold fused"
    ):
        resolve_targets(model, Targets(layers=1, matrices="all"))  # a chosen layer that holds none of the group
    assert_exact_at_full_rank(model)


def test_falcon_h1_reads_its_attention_and_mlp_beside_the_parallel_mamba():
    """Falcon-H1 runs Mamba-2 beside attention in every block: Mamba's in_proj / out_proj play no
    alias (they stay selectable by regex), so the block reads as a full row."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {
        **LLAMA_SIZES,
        "head_dim": 8,
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_ssm": 64,
        "mamba_d_state": 8,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("falcon_h1", **sizes)).float().eval()
    match = find_family(model)
    assert (match.matched_by, dict(match.family.unsupported)) == ("module names", {})
    assert resolve_targets(model, Targets(layers=-1, matrices="all")) == [
        *(f"model.layers.1.feed_forward.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
        *(f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    ]
    with truncate_(model, r"model\.layers\.1\.mamba\.out_proj", 4) as truncation:
        assert list(truncation) == ["model.layers.1.mamba.out_proj"]
    assert_exact_at_full_rank(model)


class MixerBlock(nn.Module):
    """An MLP (gated, or fused experts) after an attention (q, k, v, o; or q, k, v, wo) or another
    mixer (in_proj, a conv, out_proj)."""

    def __init__(self, attention: bool, d: int = 4, experts: bool = False, out: str = "o_proj"):
        super().__init__()
        if attention:
            self.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", out):
                setattr(self.self_attn, name, nn.Linear(d, d))
        else:
            self.mixer = nn.Module()
            self.mixer.in_proj, self.mixer.out_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            self.mixer.conv1d = nn.Conv1d(2 * d, 2 * d, 3, groups=2 * d)  # a 3-D weight, not experts
        self.mlp = nn.Module()
        if experts:
            self.mlp.experts = nn.Module()
            self.mlp.experts.gate_up_proj = nn.Parameter(torch.randn(3, d, 16))
            self.mlp.experts.down_proj = nn.Parameter(torch.randn(3, 8, d))
        else:
            self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj = nn.Linear(d, 8), nn.Linear(d, 8), nn.Linear(8, d)


def hybrid(*attention: bool, **kinds) -> nn.Module:
    return nn.ModuleDict({"layers": nn.ModuleList(MixerBlock(a, **kinds) for a in attention)})


def test_hybrid_reading_needs_one_mlp_and_one_whole_attention():
    match = find_family(hybrid(False, True, False, True))
    assert sorted(match.family.matrices) == sorted(GATED) and match.family.only_in["attn_out"][0] == (1, 3)
    # Experts in every block (Qwen3-Next, Jamba's kin): the attention where it is, the MLP refused.
    model = hybrid(False, True, False, True, experts=True)
    match = find_family(model)
    assert sorted(match.family.matrices) == ["attn_k", "attn_out", "attn_q", "attn_qkv", "attn_v"]
    assert resolve_targets(model, Targets(matrices="all")) == [
        f"layers.{i}.self_attn.{p}" for i in (1, 3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    with pytest.raises(ValueError, match=r"matrix 'mlp_in' cannot be truncated in .*fused 3-D parameters"):
        resolve_targets(model, Targets(layers=1, matrices="mlp_in"))
    # Jamba's kind: attention in some blocks, experts in others, independently: each where it is.
    model = nn.ModuleDict({"layers": nn.ModuleList(MixerBlock(i == 2, experts=i % 2 == 1) for i in range(4))})
    only_in = {alias: layers for alias, (layers, _) in find_family(model).family.only_in.items()}
    assert only_in == {**dict.fromkeys(("mlp_in", "mlp_up", "mlp_out"), (0, 2)), **dict.fromkeys(GATED[3:], (2,))}
    assert resolve_targets(model, Targets(layers=2, matrices="all")) == [
        *(f"layers.2.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
        *(f"layers.2.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    ]
    with pytest.raises(
        ValueError, match=r"'attn_out' is only in layer 2 .*, not in layer 0 \(layers 0, 1, 3 hold mixer"
    ):
        resolve_targets(model, Targets(layers=0, matrices="attn_out"))
    # Without any attention the blocks still read (MLP only), saying so.
    with pytest.raises(
        ValueError, match=r"its blocks hold no attention known by name \(layers 0-1 hold mixer\.in_proj"
    ):
        resolve_targets(hybrid(False, False), Targets(layers=0, matrices="attn_out"))
    with pytest.raises(ValueError, match=r"matches no known model family"):  # ... and with experts, nothing reads
        find_family(hybrid(False, False, experts=True))
    model = hybrid(True, True, experts=True)  # experts, and two attentions that differ (MiniMax): nothing reads
    model["layers"][1] = MixerBlock(True, experts=True, out="wo")
    with pytest.raises(ValueError, match=r"matches no known model family"):
        find_family(model)
    # Attentions that differ among themselves (o_proj in one, wo in another): MLP only, naming both.
    model = hybrid(False, True, True)
    model["layers"][2] = MixerBlock(True, out="wo")
    with pytest.raises(ValueError, match=r"its blocks hold attentions that differ \(layer 0 holds mixer\.in_proj"):
        resolve_targets(model, Targets(layers=1, matrices="attn_q"))
    assert resolve_targets(model, Targets(layers=2, matrices="mlp_out")) == ["layers.2.mlp.down_proj"]
    # An attention only partly known by name stays refused, with the block's own reason.
    model = hybrid(False, True, False, True)
    del model["layers"][3].self_attn.k_proj
    with pytest.raises(ValueError, match=r"layers\.3: only some of the query, key and value projections"):
        find_family(model)
    model["layers"][3] = MixerBlock(True)
    model["layers"][3].mlp.up_proj = nn.Identity()  # the MLPs differ: refused
    with pytest.raises(ValueError, match=r"matches no known model family"):
        find_family(model)


def test_a_multimodal_model_reads_its_language_blocks_not_its_vision_tower():
    """A vision (or audio) tower's list of blocks is not the language model's, even when it is as
    long or longer; it stays selectable by regex."""
    model = nn.Module()
    model.vision_tower = nn.Module()
    model.vision_tower.layers = nn.ModuleList(UpDownBlock() for _ in range(3))
    model.language_model = nn.Module()
    model.language_model.layers = nn.ModuleList(UpDownBlock() for _ in range(2))
    match = find_family(model)
    assert (match.path, match.n_layers) == ("language_model.layers", 2)
    assert resolve_targets(model, r"vision_tower\.layers\.0\.mlp\.up_proj") == ["vision_tower.layers.0.mlp.up_proj"]
    del model.language_model  # a tower alone is still read
    assert find_family(model).path == "vision_tower.layers"


def test_a_list_of_linears_is_no_list_of_blocks_and_an_empty_first_block_is_a_clean_refusal():
    """Gemma 3n keeps its AltUp projections in a ModuleList of linears, longer than its blocks."""
    model = nn.Module()
    model.layers = nn.ModuleList(UpDownBlock() for _ in range(2))
    model.projections = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    assert find_family(model).path == "layers"
    blocks = nn.ModuleList(UpDownBlock() for _ in range(2))
    blocks[0].attn, blocks[0].mlp = nn.Module(), nn.Module()  # block 0 holds no linear at all
    with pytest.raises(ValueError, match=r"matches no known model family .*its linears: layers_\.1\.attn\.q_proj"):
        find_family(nn.ModuleDict({"layers_": blocks}))


def test_cross_attention_plays_no_alias_and_stays_selectable_by_regex():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("bart", **BART_SIZES)).eval()
    names = resolve_targets(model, Targets(matrices="all"))
    assert names and not any("encoder_attn" in n for n in names)
    cross = r"model\.decoder\.layers\.1\.encoder_attn\.q_proj"
    with truncate_(model, cross, 4) as truncation:
        assert list(truncation) == ["model.decoder.layers.1.encoder_attn.q_proj"]


def test_a_masked_roberta_reads_like_its_decoder():
    """LASER's RoBERTa is the masked LM: its encoder layers read the same way, MLP and attention."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(**{**BERT_SIZES, "is_decoder": False})).eval()
    match = find_family(model)
    assert (match.matched_by, match.path, match.n_layers) == ("module names", "roberta.encoder.layer", 2)
    assert resolve_targets(model, Targets(layers=[-1], matrices="all")) == list(BERT_LAST)
    assert_exact_at_full_rank(model)


@pytest.mark.parametrize(
    "variant",
    [
        {"new_decoder_architecture": True, "num_kv_heads": 2},
        {"multi_query": False, "parallel_attn": False, "bias": True},
    ],
    ids=["falcon-40b-like", "falcon-rw-like"],
)
def test_falcon_variants_keep_the_row(variant):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(**ROWS["falcon"].config, **variant)).eval()
    assert resolve_targets(model, Targets(layers=[-1], matrices="all")) == list(BLOOM_LAST)
    assert_exact_at_full_rank(model)


class Attention(nn.Module):
    def __init__(self, d: int, fused: bool):
        super().__init__()
        if fused:
            self.Wqkv = nn.Linear(d, 3 * d)
        else:
            self.wq, self.wk, self.wv = (nn.Linear(d, d) for _ in range(3))
        self.proj = nn.Linear(d, d)
        self.fused = fused

    def forward(self, x):
        q, k, v = self.Wqkv(x).chunk(3, -1) if self.fused else (self.wq(x), self.wk(x), self.wv(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        return self.proj(weights @ v)


class FeedForward(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.taps = nn.ModuleList(nn.Linear(d, d) for _ in range(5))  # longer than the block list, nested

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class NamedBlock(nn.Module):
    def __init__(self, d: int, fused: bool = False):
        super().__init__()
        self.attention, self.feed_forward = Attention(d, fused), FeedForward(d)

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class Decoder(nn.Module):
    """No config and names no row has: only the linears' well-known names say what they are."""

    def __init__(self, d: int = 8, n: int = 3, fused: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList(NamedBlock(d, fused) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n + 1))  # holds no linears
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.trunk.stack:
            x = block(x)
        return self.head(x)


def test_a_model_without_a_row_is_read_by_module_names():
    model = Decoder().eval()
    match = find_family(model)
    assert (match.family.name, match.matched_by, match.path, match.n_layers) == (
        "NamedBlock",
        "module names",
        "trunk.stack",
        3,
    )
    assert resolve_targets(model, Targets(layers=[-1], matrices="all")) == [
        "trunk.stack.2.feed_forward.w1",
        "trunk.stack.2.feed_forward.w3",
        "trunk.stack.2.feed_forward.w2",
        "trunk.stack.2.attention.wq",
        "trunk.stack.2.attention.wk",
        "trunk.stack.2.attention.wv",
        "trunk.stack.2.attention.proj",
    ]
    assert_exact_at_full_rank(model, forward=logits_of)


def test_a_fused_projection_read_by_module_names_names_the_fused_alias():
    model = Decoder(fused=True)
    assert resolve_targets(model, Targets(layers=0, matrices="attn")) == [
        "trunk.stack.0.attention.Wqkv",
        "trunk.stack.0.attention.proj",
    ]
    with pytest.raises(ValueError, match="'attn_k' is part of a fused matrix in NamedBlock; .* 'attn_qkv'"):
        resolve_targets(model, Targets(layers=0, matrices="attn_k"))


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


class CrossBlock(nn.Module):
    """Two attentions, each with a q_proj: which one is attn_q cannot be told by name (a
    sub-module named as a cross-attention, encoder_attn or cross_attn, would be left out)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.self_attn, self.local_attn = nn.Module(), nn.Module()
        for attn in (self.self_attn, self.local_attn):
            attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


@pytest.mark.parametrize(
    "model, reason, listed",
    [
        (
            nn.ModuleDict({"blocks_": nn.ModuleList([CrossBlock(), CrossBlock()])}),
            r"2 linears look like attn_q \(self_attn\.q_proj, local_attn\.q_proj\)",
            r"blocks_\.<i>\.\{self_attn\.q_proj, self_attn\.k_proj, .*, mlp\.fc2\}",
        ),
        (
            nn.ModuleDict(
                {"a": nn.ModuleList([NamedBlock(4), NamedBlock(4)]), "b": nn.ModuleList([NamedBlock(4), NamedBlock(4)])}
            ),
            r"2 lists of 2 blocks fit: a, b",
            r"a\.<i>\.\{attention\.wq, ",
        ),
        (
            nn.ModuleDict(
                {"layers_": nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3))}
            ),
            r"layers_\.0: no linear is known by name as attn_qkv, attn_out, mlp_in, mlp_out",
            r"layers_\.<i>\.\{0, 1\}",
        ),
    ],
    ids=["two-attentions", "two-block-lists", "unknown-names"],
)
def test_an_ambiguous_model_lists_its_linears_and_says_how_to_select_them(model, reason, listed):
    before = state_hash(model)
    with pytest.raises(ValueError) as info:
        truncate_(model, Targets(layers=0), 0.5)
    message = str(info.value)
    assert "matches no known model family" in message and "\n" not in message
    assert re.search(reason, message), message
    assert "select its linears by regex or by a callable (name, module) -> bool instead" in message
    assert re.search(rf"its linears: {listed}", message), message
    assert state_hash(model) == before
    example = re.search(r"truncate_\(model, r'([^']+)', rank\)", message).group(1)
    assert resolve_targets(model, example)  # the regex the message suggests selects something


@pytest.mark.parametrize(
    "rel, role",
    [
        ("self_attn.q_proj", "attn_q"),
        ("attention.query_key_value", "qkv"),
        ("attn.c_proj", "attn_out"),
        ("mlp.c_proj", "mlp_out"),
        ("self_attention.dense", "attn_out"),
        ("mlp.dense", "mlp_out"),
        ("dense", None),  # an output projection of what? the name alone does not say
        ("fc1", "mlp_in"),
        ("ff.w2", "mlp_out"),
        ("mlp.gate_up_proj", "gate_up"),
        ("self_attn.gate_proj", None),  # an attention output gate is not the MLP's gate
        ("feed_forward.key", None),  # RWKV's channel mix: a "key" inside the MLP is no attention key
        ("mlp.router", None),
        ("mamba.out_proj", None),  # a state-space mixer's projections play no alias
        ("linear_attn.out_proj", None),  # nor do a linear attention's (Qwen3-Next's Gated DeltaNet)
        ("self_attn.q_proj.linear", "attn_q"),  # a wrapper's one linear is named by the wrapper (Moshi)
        ("mlp.fc1.linear", "mlp_in"),
    ],
)
def test_linears_are_classified_by_name_and_the_sub_module_around_them(rel, role):
    from fasttrunc.families import _role

    assert _role(rel) == role


class UpDownBlock(nn.Module):
    """An ungated MLP named up/down: its up projection is its input."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Module()
        self.mlp.up_proj, self.mlp.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


def test_an_ungated_up_down_mlp_reads_as_mlp_in_and_mlp_out():
    model = nn.ModuleDict({"layers_": nn.ModuleList(UpDownBlock() for _ in range(2))})
    match = find_family(model)
    assert match.matched_by == "module names" and "mlp_up" not in match.family.matrices
    assert resolve_targets(model, Targets(layers=1, matrices="mlp")) == [
        "layers_.1.mlp.up_proj",
        "layers_.1.mlp.down_proj",
    ]


def test_blocks_that_read_differently_are_ambiguous():
    blocks = nn.ModuleList([UpDownBlock(), UpDownBlock()])
    blocks[1].mlp.up_proj = nn.Identity()  # block 1 lost its MLP input: no one row fits both
    with pytest.raises(ValueError, match=r"matches no known model family .*layers_\.1: no linear is known by name"):
        find_family(nn.ModuleDict({"layers_": blocks}))
    blocks[1].mlp.up_proj = nn.Linear(4, 8)
    blocks[1].mlp.gate_proj = nn.Linear(4, 8)  # block 1 is gated, block 0 is not
    with pytest.raises(ValueError, match=r"its blocks differ: layers_\.0 and layers_\.1 do not hold the same linears"):
        find_family(nn.ModuleDict({"layers_": blocks}))


class DenseOrExpertsBlock(nn.Module):
    """One attention over either a dense gated MLP or experts fused into 3-D parameters."""

    def __init__(self, dense: bool, d: int = 4):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d))
        self.mlp = nn.Module()
        if dense:
            self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj = nn.Linear(d, 8), nn.Linear(d, 8), nn.Linear(8, d)
        else:
            self.mlp.experts = nn.Module()
            self.mlp.experts.gate_up_proj = nn.Parameter(torch.randn(3, d, 16))
            self.mlp.experts.down_proj = nn.Parameter(torch.randn(3, 8, d))


def test_dense_layers_before_experts_read_their_mlp_there_only():
    """The first layers of many mixtures of experts are dense (glm4_moe, ernie4_5_moe, ...): the
    attention aliases are in every layer, the MLP aliases in the dense layers only, and asking
    one of an experts layer says where they are."""
    model = nn.ModuleDict({"layers": nn.ModuleList(DenseOrExpertsBlock(i < 2) for i in range(4))})
    match = find_family(model)
    assert (match.matched_by, match.n_layers, dict(match.family.unsupported)) == ("module names", 4, {})
    assert {alias: layers for alias, (layers, _) in match.family.only_in.items()} == dict.fromkeys(
        ("mlp_in", "mlp_up", "mlp_out"), (0, 1)
    )
    assert resolve_targets(model, Targets(layers=[0, -1], matrices="all")) == [
        *(f"layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
        *(f"layers.{i}.self_attn.{p}" for i in (0, 3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    ]
    assert resolve_targets(model, Targets(matrices="mlp")) == [  # a group over every layer: where it is
        f"layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")
    ]
    with pytest.raises(ValueError, match=r"'mlp_out' is only in layers 0-1 .*, not in layer 2"):
        resolve_targets(model, Targets(matrices="mlp_out"))  # named alone: every layer must hold it
    before = state_hash(model)
    with pytest.raises(ValueError) as info:
        truncate_(model, Targets(layers=2, matrices="mlp_in"), 0.5)
    message = str(info.value)
    assert (
        "\n" not in message
        and "matrix 'mlp_in' is only in layers 0-1 of DenseOrExpertsBlock, not in layer 2" in message
    )
    assert "layers 2-3 hold fused experts (mlp.experts.gate_up_proj, mlp.experts.down_proj) instead" in message
    assert no_truncated(model) and state_hash(model) == before
    # Any other difference (here block 3's attention loses a projection) is still refused.
    model["layers"][3].self_attn.o_proj = nn.Identity()
    with pytest.raises(ValueError, match=r"layers\.3: no linear is known by name as attn_out"):
        find_family(model)
    model["layers"][3] = DenseOrExpertsBlock(True)  # dense, dense, experts, dense: layers listed one by one
    with pytest.raises(ValueError, match=r"is only in layers 0, 1, 3 of .*layer 2 holds fused experts"):
        truncate_(model, Targets(layers=2, matrices="mlp_out"), 0.5)


class LatentAttentionBlock(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3's names) over a dense gated MLP."""

    def __init__(self, low_rank_query: bool = True, d: int = 8):
        super().__init__()
        attn = self.self_attn = nn.Module()
        if low_rank_query:
            attn.q_a_proj, attn.q_b_proj = nn.Linear(d, 4), nn.Linear(4, d)
        else:
            attn.q_proj = nn.Linear(d, d)
        attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj = nn.Linear(d, 6), nn.Linear(4, 2 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj = nn.Linear(d, 16), nn.Linear(d, 16), nn.Linear(16, d)


@pytest.mark.parametrize("low_rank_query", [True, False], ids=["q_a-q_b", "q_proj"])
def test_latent_attention_reads_its_query_and_refuses_keys_and_values_alone(low_rank_query):
    model = nn.ModuleDict({"layers": nn.ModuleList(LatentAttentionBlock(low_rank_query) for _ in range(2))})
    match = find_family(model)
    assert match.matched_by == "module names" and "mlp_in" not in match.family.unsupported
    query = ["q_a_proj", "q_b_proj"] if low_rank_query else ["q_proj"]
    attn = [f"layers.1.self_attn.{p}" for p in query]
    assert resolve_targets(model, Targets(layers=-1, matrices="attn_q")) == attn
    assert resolve_targets(model, Targets(layers=-1, matrices="attn")) == [
        *attn,
        "layers.1.self_attn.kv_a_proj_with_mqa",
        "layers.1.self_attn.kv_b_proj",
        "layers.1.self_attn.o_proj",
    ]
    assert resolve_targets(model, Targets(layers=-1, matrices="mlp_out")) == ["layers.1.mlp.down_proj"]
    for alias in ("attn_k", "attn_v"):
        with pytest.raises(ValueError, match=rf"matrix '{alias}' cannot be truncated in .*multi-head latent attention"):
            resolve_targets(model, Targets(layers=-1, matrices=alias))
    del model["layers"][1].self_attn.kv_b_proj  # half a latent key-value path: not read
    with pytest.raises(ValueError, match=r"layers\.1: only part of a latent attention is known by name"):
        find_family(model)


def test_deepseek_v3_reads_latent_attention_over_a_dense_layer_and_experts():
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB)
    sizes |= dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2)
    sizes |= dict(n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8)
    sizes |= dict(qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v3", **sizes)).float().eval()
    match = find_family(model)
    assert (match.matched_by, match.n_layers) == ("module names", 3)
    assert resolve_targets(model, Targets(layers=0, matrices="attn_qkv")) == [
        f"model.layers.0.self_attn.{p}" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    ]
    assert resolve_targets(model, Targets(layers=0, matrices="mlp_in")) == ["model.layers.0.mlp.gate_proj"]
    with pytest.raises(
        ValueError, match=r"'mlp_in' is only in layer 0 of deepseek_v3, not in layer 1 \(layers 1-2 hold fused"
    ):
        resolve_targets(model, Targets(layers=1, matrices="mlp_in"))
    assert_exact_at_full_rank(model)


def test_the_toy_row_lists_no_model_type_and_is_found_by_its_layout():
    block = nn.Module()
    block.attn, block.ff = nn.Module(), nn.Module()
    block.attn.wk, block.attn.wv, block.attn.wo = (nn.Linear(4, 4, bias=False) for _ in range(3))
    block.ff.w1, block.ff.w2 = nn.Linear(4, 8), nn.Linear(8, 4)
    model = nn.ModuleDict({"blocks": nn.ModuleList([block])})
    match = find_family(model)
    assert (match.family.name, match.matched_by, match.n_layers) == ("toy-transformer", "row layout", 1)
    with pytest.raises(ValueError, match="'attn_q' cannot be truncated in toy-transformer: .* is the identity"):
        resolve_targets(model, Targets(matrices="attn_q"))


@pytest.mark.parametrize("model_type", [t for t in TYPES if t not in MOE_TYPES])
def test_reading_by_module_names_agrees_with_every_row(model_type):
    from fasttrunc.families import _family_by_names

    with torch.device("meta"):
        model = tiny(model_type)
    family, path, n_layers = _family_by_names(model, "unlisted")
    row = find_family(model).family
    assert (path, n_layers) == (find_family(model).path, 2)
    assert dict(family.matrices) == dict(row.matrices) and dict(family.fused) == dict(row.fused)


# --- describe_targets ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_describe_from_a_config_alone_matches_the_built_model(model_type):
    row = ROWS[model_type]
    from_config = fasttrunc.describe_targets(tiny_config(model_type), layers=[-1, 0])
    model = tiny(model_type)
    from_model = fasttrunc.describe_targets(model, layers=[-1, 0])
    assert from_config.to_dict() == from_model.to_dict()
    assert (from_config.family, from_config.n_layers, from_config.aliases) == (row.family, 2, row.aliases)
    assert [layer.index for layer in from_config.layers] == [1, 0]
    assert from_config.names() == resolve_targets(model, Targets(layers=[-1, 0], matrices="all"))
    last = from_config.layers[0].matrices
    assert [m.name for mats in last.values() for m in mats] == list(row.last)
    for mats in last.values():
        for name, shape in mats:
            module = model.get_submodule(name)
            weight = module.weight
            assert shape == (tuple(weight.shape) if isinstance(module, nn.Linear) else tuple(weight.shape)[::-1])
    json.loads(json.dumps(from_config.to_dict()))


def test_describe_gives_typed_layers_and_text():
    from transformers import LlamaConfig

    description = fasttrunc.describe_targets(LlamaConfig(**LLAMA_SIZES), layers=1, matrices=["mlp", "attn_k"])
    assert description.matched_by == "model_type" and description.layers_path == "model.layers"
    (layer,) = description.layers
    assert layer.index == 1
    assert {alias: [(m.name, m.shape) for m in mats] for alias, mats in layer.matrices.items()} == {
        "mlp_in": [("model.layers.1.mlp.gate_proj", (48, 32))],
        "mlp_up": [("model.layers.1.mlp.up_proj", (48, 32))],
        "mlp_out": [("model.layers.1.mlp.down_proj", (32, 48))],
        "attn_k": [("model.layers.1.self_attn.k_proj", (16, 32))],
    }
    text = description.format()
    assert text.splitlines()[0].startswith("family llama (model_type 'llama', LlamaForCausalLM; matched by model_type)")
    assert re.search(r"\n1 +mlp_out +model\.layers\.1\.mlp\.down_proj +32 x 48\n", text), text
    assert description.to_dict()["layers"][0]["matrices"]["attn_k"] == [
        {"name": "model.layers.1.self_attn.k_proj", "shape": [16, 32]}
    ]


def test_describe_checks_like_truncate_and_leaves_the_model_alone():
    from transformers import GPT2Config, T5Config

    config = tiny_config("gpt2")
    with pytest.raises(ValueError, match=re.escape("layer 5 is out of range for a model with 2 layers")):
        fasttrunc.describe_targets(config, layers=5)
    with pytest.raises(ValueError, match="matrix 'mlp_up' does not exist in gpt2; it has: mlp_in, mlp_out, attn_qkv"):
        fasttrunc.describe_targets(config, matrices="mlp_up")
    with pytest.raises(ValueError, match="'attn_v' is part of a fused matrix in gpt2"):
        fasttrunc.describe_targets(GPT2Config(n_layer=1, n_embd=8, n_head=2), matrices="attn_v")
    with pytest.raises(ValueError, match="T5Config .* has no causal-LM class"):
        fasttrunc.describe_targets(T5Config(num_layers=1, d_model=8, d_kv=4, d_ff=8, num_heads=2))
    with pytest.raises(TypeError, match="describe_targets needs a torch.nn.Module or a transformers PretrainedConfig"):
        fasttrunc.describe_targets({"model_type": "llama"})
    model = tiny("phi3")
    before = state_hash(model)
    assert len(fasttrunc.describe_targets(model).names()) == 8
    assert state_hash(model) == before and no_truncated(model)
