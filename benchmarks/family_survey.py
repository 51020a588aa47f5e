"""How fasttrunc reads every causal-LM type of the installed transformers (CPU, tiny random models).

    python benchmarks/family_survey.py [--types llama,bert,...] [--json PATH] [--timeout S]

For each ``model_type`` in transformers' causal-LM mapping (or the listed ones): a model built
from its default config shrunk to tiny sizes (2 layers, width 64), then how fasttrunc reads it:

- ``row``: a family row lists its ``model_type``; ``module names``: its blocks read by their
  linears' names; either way ``targets`` counts the matrices of both layers (``matrices="all"``) and
  ``full_rank_error`` is the largest relative logit change with those truncated at full rank
  (fp32 rounding only: 1e-6 to a few 1e-5);
- ``attention only``: the MLP is fused experts in every layer, so only the attention aliases apply
  (in the layers that hold them);
- ``per layer``: some aliases are in some layers only: a hybrid's attention (beside Mamba, a
  convolution, a recurrence, a linear attention in the other layers), or the MLP of the dense
  layers beside fused experts;
- ``MLP only``: no attention known by name in any block, or attentions that differ between
  blocks, so only the MLP aliases apply;
- ``no family``: fasttrunc refuses it with the reason it gives (select by regex instead);
- ``not built`` / ``timeout``: the tiny config does not make a working model (the survey's
  shrinking, not fasttrunc), or building and running took longer than ``--timeout``.

Prints one line per type and a summary; ``--json`` keeps every record. Reads no network.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

# Tiny sizes, set where the config has the field (names differ across families).
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "head_dim": 16,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "d_model": 64,
    "num_layers": 2,
    "ffn_dim": 128,
    "n_positions": 64,
    "decoder_layers": 2,  # seq2seq decoders
    "encoder_layers": 2,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,  # a dense first layer beside experts, where a family has both
    # multi-head latent attention
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # Gemma 3n / 4's per-layer inputs (an embedding of the whole vocabulary per layer)
    "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 16,
    "num_kv_shared_layers": 0,  # Gemma 3n's key-value sharing needs more layers than 2
}

# Hybrids: the second of the two layers an attention, the first the type's other token mixer (their
# defaults put attention at indices a 2-layer model does not have, and transformers' forward then fails).
HYBRID_LAYERS = {
    "bamba": {"attn_layer_indices": [1]},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},  # Qwen3.5's text_config
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 0},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"]},
    "bailing_hybrid": {"layer_types": ["linear_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"]},
}


class _Timeout(Exception):
    pass


def _sizes(defaults: Any, model_type: str | None = None) -> dict[str, Any]:
    """The TINY sizes a config has (as settable fields, not derived properties), with token ids
    moved inside the tiny vocabulary and, for a composite config (a multimodal model's), each
    sub-config (``text_config``, ``vision_config``, ...) shrunk the same way, as a dict."""
    # (A config's own fields: hasattr would read per-layer fields, which heterogeneous configs refuse.)
    settable = [
        name
        for name in TINY
        if (name in vars(defaults) or hasattr(type(defaults), name))
        and not isinstance(getattr(type(defaults), name, None), property)
    ]
    sizes = {name: TINY[name] for name in settable}
    for name, tiny_id in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        value = getattr(defaults, name, None)
        if isinstance(value, int) and value >= TINY["vocab_size"]:
            sizes[name] = tiny_id
    sizes.update(HYBRID_LAYERS.get(model_type or defaults.model_type, {}))
    if isinstance(getattr(defaults, "per_layer_config", None), dict):
        sizes["per_layer_config"] = {}  # overrides keyed by layer indices the tiny depth does not have
    if "qk_rope_head_dim" in sizes:
        sizes.pop("head_dim", None)  # latent attention: derived from the rotary part
    for name, value in vars(defaults).items():
        if hasattr(value, "to_dict") and isinstance(getattr(value, "model_type", None), str):
            layers = getattr(value, "num_hidden_layers", None)
            kept = {  # per-layer lists (layer_types, ...) are derived again for the tiny depth
                key: item
                for key, item in value.to_dict().items()
                if not (isinstance(item, list) and layers and len(item) == layers)
            }
            sizes[name] = {**kept, **_sizes(value)}
    return sizes


def _set_sizes(config: Any, sizes: dict[str, Any]) -> None:
    """Set what a config takes of ``sizes`` one by one (sub-configs' included), skipping refusals."""
    for name, value in sizes.items():
        try:
            if isinstance(value, dict):
                _set_sizes(getattr(config, name), _sizes(getattr(config, name)))
            else:
                setattr(config, name, value)
        except Exception:  # noqa: BLE001 - a size this config refuses
            pass


def _tiny_model(model_type: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    defaults = AutoConfig.for_model(model_type)
    sizes = _sizes(defaults, model_type)
    try:  # through the constructor, so that derived sizes (head_dim of latent attention, ...) follow
        config = AutoConfig.for_model(model_type, **sizes)
    except Exception:  # noqa: BLE001 - a config that refuses some size: set those it takes one by one
        config = defaults
        _set_sizes(config, sizes)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _status(family: Any, matched_by: str) -> str:
    """The record's status of a readable type (see the module docstring)."""
    if "mlp_in" in family.unsupported:
        return "attention only"
    if "attn_qkv" in family.unsupported:
        return "MLP only"
    return "per layer" if family.only_in else matched_by


def survey_one(model_type: str) -> dict[str, Any]:
    """The record of one model type (see the module docstring for its ``status``)."""
    import torch

    import fasttrunc
    from fasttrunc.families import find_family
    from fasttrunc.truncation import Targets, resolve_targets

    try:
        model = _tiny_model(model_type)
    except _Timeout:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the survey's own shrinking
        return {"status": "not built", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    try:
        match = find_family(model)
    except ValueError as exc:
        return {"status": "no family", "reason": str(exc)}
    by = {"model_type": "row"}.get(match.matched_by, match.matched_by)
    record: dict[str, Any] = {
        "status": _status(match.family, by),
        "family": match.family.name,
        "layers": match.n_layers,
    }
    targets = Targets(matrices="all")  # every layer, each with the members it holds
    try:
        record["targets"] = len(resolve_targets(model, targets))
    except ValueError as exc:  # a row whose aliases select nothing: a finding, not a crash of the survey
        record["targets_error"] = str(exc)
        return record
    ids = torch.randint(0, 100, (1, 8))
    try:
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            with fasttrunc.truncate_(model, targets, rank=1.0):
                out = model(input_ids=ids).logits
    except _Timeout:
        raise
    except Exception as exc:  # noqa: BLE001 - the tiny model's own forward
        record["forward"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return record
    record["full_rank_error"] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return record


def survey(types: list[str] | None = None, timeout: int = 60) -> dict[str, dict[str, Any]]:
    """Every record, by model type; each type bounded by ``timeout`` seconds (SIGALRM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if types is not None:
        unknown = [t for t in types if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
        if unknown:
            raise ValueError(f"model types {unknown} are not causal-LM types of this transformers")
        known = types

    def alarm(signum: int, frame: object) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    records: dict[str, dict[str, Any]] = {}
    try:
        for model_type in known:
            signal.alarm(timeout)
            try:
                records[model_type] = survey_one(model_type)
            except _Timeout:
                records[model_type] = {"status": "timeout"}
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=None, help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=int, default=60, help="seconds per model type")
    args = parser.parse_args(argv)
    try:
        records = survey(None if args.types is None else args.types.split(","), args.timeout)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for model_type, record in records.items():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        detail = {k: v for k, v in record.items() if k != "status"}
        if "reason" in detail:  # the informative part: why its blocks cannot be read
            reason = detail["reason"]
            start = reason.find("cannot be read by module names")
            detail["reason"] = reason[start if start >= 0 else 0 :][:200]
        print(f"{model_type}: {record['status']} {json.dumps(detail)}")
    print("summary: " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) + f" of {len(records)}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
