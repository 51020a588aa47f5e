"""Model family rows and module kinds: where a model keeps its blocks, and what each matrix alias names.

A *family row* says, for one kind of model, where its ``nn.ModuleList`` of blocks lives and which
linear modules inside one block each matrix alias names. A new family is a new row, not a new
code path. Rows are found from ``config.model_type`` first, then by structure: the model's list
of blocks and the well-known names of the linears in them (:func:`find_family`).

A *module kind* is a class of module that holds one weight matrix fasttrunc can truncate:
``nn.Linear`` (and subclasses) and transformers' ``Conv1D`` (GPT-2; weight stored ``(in, out)``).
This module is the one place that knows how to read such a weight as ``(out, in)`` and write a
dense one back.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

# --- matrix aliases ----------------------------------------------------------------------------

# LASER's names where LASER has them: mlp_in is LASER's fc_in (on gated MLPs the gate projection),
# mlp_up the up projection of gated MLPs, mlp_out fc_out; attn_qkv is all three attention input
# projections, fused or not.
MATRIX_ALIASES = ("mlp_in", "mlp_up", "mlp_out", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out")
MATRIX_GROUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp_in", "mlp_up", "mlp_out"),
    "attn": ("attn_qkv", "attn_out"),
    "all": ("mlp_in", "mlp_up", "mlp_out", "attn_qkv", "attn_out"),
}
# The attention parts that attn_qkv is made of, when a family keeps them apart.
QKV_PARTS = ("attn_q", "attn_k", "attn_v")


# --- module kinds ------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    # transformers is imported by whoever built the model; fasttrunc does not import it to check.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


@dataclass(frozen=True)
class ModuleKind:
    """How to read and write the one weight matrix of a kind of module, as ``(out, in)``."""

    name: str
    matches: Callable[[nn.Module], bool]
    transposed: bool  # True when the module stores its weight as (in, out)

    @staticmethod
    def _stored(module: nn.Module) -> torch.Tensor:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def parameter(self, module: nn.Module) -> torch.Tensor:
        """The weight as stored (the parameter itself: its dtype, device and ``requires_grad``)."""
        return self._stored(module)

    @staticmethod
    def bias(module: nn.Module) -> torch.Tensor | None:
        bias = getattr(module, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight as an ``(out, in)`` tensor (a view; detached)."""
        w = self._stored(module).detach()
        return w.t() if self.transposed else w

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        rows, cols = self._stored(module).shape
        return (cols, rows) if self.transposed else (rows, cols)

    def write_weight(self, module: nn.Module, dense: torch.Tensor) -> None:
        """Copy a dense ``(out, in)`` weight into ``module``, in the module's own layout and dtype."""
        with torch.no_grad():
            self._stored(module).copy_(dense.t() if self.transposed else dense)


LINEAR = ModuleKind("nn.Linear", lambda m: isinstance(m, nn.Linear), transposed=False)
CONV1D = ModuleKind("Conv1D", _is_conv1d, transposed=True)
MODULE_KINDS: tuple[ModuleKind, ...] = (LINEAR, CONV1D)


def module_kind(module: object) -> ModuleKind | None:
    """The kind of ``module``, or None when fasttrunc cannot truncate it."""
    if not isinstance(module, nn.Module):
        return None
    for kind in MODULE_KINDS:
        if kind.matches(module):
            return kind
    return None


def kind_names() -> str:
    return ", ".join(kind.name for kind in MODULE_KINDS)


def truncatable_names(model: nn.Module) -> list[str]:
    """Qualified names of every module of a supported kind, in model order."""
    return [name for name, module in model.named_modules() if module_kind(module) is not None]


# --- family rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Where a family keeps its blocks and, inside one block, which modules each alias names.

    ``matrices`` maps an alias to module names relative to one block. ``fused`` maps an alias
    that is part of a fused matrix to the alias that names the fused one (GPT-NeoX's ``attn_q``
    lives in ``attn_qkv``); ``unsupported`` maps an alias to why this family cannot truncate it.
    ``only_in`` maps an alias that only some blocks hold (a hybrid model's attention, the MLP of
    the dense layers beside fused experts) to those blocks' layer indices and what the other
    layers hold instead; any other alias is in every layer.
    """

    name: str
    model_types: tuple[str, ...]
    layer_containers: tuple[str, ...]  # tried in order: the ModuleList of blocks
    matrices: Mapping[str, tuple[str, ...]]
    fused: Mapping[str, str] = field(default_factory=dict)
    unsupported: Mapping[str, str] = field(default_factory=dict)
    example: str = ""  # a hub id of this family, for the documentation
    only_in: Mapping[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)

    def aliases(self) -> tuple[str, ...]:
        return tuple(a for a in MATRIX_ALIASES if a in self.matrices)

    def in_layer(self, alias: str, layer: int) -> bool:
        """Whether block ``layer`` holds ``alias`` (one the family has), counting from 0."""
        return alias not in self.only_in or layer in self.only_in[alias][0]

    def not_in_layer(self, alias: str, layer: int) -> ValueError:
        """The one-line error for ``alias`` asked of a block ``layer`` that does not hold it."""
        layers, others = self.only_in[alias]
        listed = ",".join(map(str, layers))
        return ValueError(
            f"matrix {alias!r} is only in {layer_list(layers)} of {self.name}, not in layer {layer} "
            f"({others}); select those layers, e.g. Targets(layers={list(layers)}, matrices={alias!r}) "
            f"(on the command line --layer {listed}, in a sweep --layers {listed})"
        )

    def mlp_module(self) -> str | None:
        """The block's MLP module (relative to one block) when the row names one that holds both
        ``mlp_in`` and ``mlp_out`` as its direct children (``mlp`` in GPT-NeoX, ``ff`` in the toy);
        None when the linears sit in the block itself (OPT) or the MLP is not linear modules (MoE)."""
        names = [n for alias in ("mlp_in", "mlp_out") for n in self.matrices.get(alias, ())]
        parents = {n.rpartition(".")[0] for n in names}
        if len(names) < 2 or len(parents) != 1:
            return None
        parent = parents.pop()
        return parent if parent and "." not in parent else None

    def names_for(self, alias: str) -> tuple[str, ...]:
        """Module names (relative to one block) that ``alias`` names, or a one-line ValueError."""
        if alias in self.matrices:
            return self.matrices[alias]
        if alias in self.unsupported:
            raise ValueError(f"matrix {alias!r} cannot be truncated in {self.name}: {self.unsupported[alias]}")
        if alias in self.fused:
            raise ValueError(
                f"matrix {alias!r} is part of a fused matrix in {self.name}; truncate the whole of it with "
                f"{self.fused[alias]!r}"
            )
        raise ValueError(f"matrix {alias!r} does not exist in {self.name}; it has: {', '.join(self.aliases())}")


# Row builders: the shapes of block that many families share, so each row states only its names.


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _attention(prefix: str, q: str, k: str, v: str, out: str) -> dict[str, tuple[str, ...]]:
    """Separate query, key and value projections (attn_qkv names all three) and an output one."""
    q, k, v = (_joined(prefix, n) for n in (q, k, v))
    return {"attn_q": (q,), "attn_k": (k,), "attn_v": (v,), "attn_qkv": (q, k, v), "attn_out": (_joined(prefix, out),)}


def _fused_attention(prefix: str, qkv: str, out: str) -> dict[str, tuple[str, ...]]:
    """One fused query-key-value projection and an output one."""
    return {"attn_qkv": (_joined(prefix, qkv),), "attn_out": (_joined(prefix, out),)}


def _mlp(prefix: str, fc_in: str, fc_out: str) -> dict[str, tuple[str, ...]]:
    return {"mlp_in": (_joined(prefix, fc_in),), "mlp_out": (_joined(prefix, fc_out),)}


def _gated_mlp(prefix: str, gate: str, up: str, down: str) -> dict[str, tuple[str, ...]]:
    """A gated MLP: mlp_in is the gate projection (as LASER maps Llama), mlp_up the up projection."""
    return {**_mlp(prefix, gate, down), "mlp_up": (_joined(prefix, up),)}


_FUSED_QKV = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv"}
_EXPERTS = (
    "its MLP is a mixture of experts whose weights are fused 3-D parameters ({where}), not linear modules; "
    "only the attention aliases (attn_q, attn_k, attn_v, attn_qkv, attn_out) apply"
)


def _experts_unsupported(where: str, extra: str = "") -> dict[str, str]:
    reason = _EXPERTS.format(where=where) + extra
    return {alias: reason for alias in MATRIX_GROUPS["mlp"]}


def _llama_shaped(name: str, model_type: str, example: str) -> Family:
    """Llama's block: ``self_attn.{q,k,v,o}_proj`` and a gated ``mlp.{gate,up,down}_proj``."""
    return Family(
        name=name,
        model_types=(model_type,),
        layer_containers=("model.layers", "layers"),
        matrices={
            **_gated_mlp("mlp", "gate_proj", "up_proj", "down_proj"),
            **_attention("self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),
        },
        example=example,
    )


def _bloom_shaped(name: str, model_type: str, example: str) -> Family:
    """BLOOM's and Falcon's block: a fused ``self_attention.query_key_value`` and NeoX-named MLP."""
    return Family(
        name=name,
        model_types=(model_type,),
        layer_containers=("transformer.h", "h"),
        matrices={
            **_mlp("mlp", "dense_h_to_4h", "dense_4h_to_h"),
            **_fused_attention("self_attention", "query_key_value", "dense"),
        },
        fused=_FUSED_QKV,
        example=example,
    )


def _moe(name: str, model_type: str, example: str, extra: str = "") -> Family:
    """A Llama-shaped attention over a mixture of experts kept as fused 3-D parameters."""
    return Family(
        name=name,
        model_types=(model_type,),
        layer_containers=("model.layers", "layers"),
        matrices=_attention("self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),
        unsupported=_experts_unsupported("mlp.experts.gate_up_proj, mlp.experts.down_proj", extra),
        example=example,
    )


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt-neox",
        model_types=("gpt_neox",),
        layer_containers=("gpt_neox.layers", "layers"),
        matrices={
            **_mlp("mlp", "dense_h_to_4h", "dense_4h_to_h"),
            **_fused_attention("attention", "query_key_value", "dense"),
        },
        fused=_FUSED_QKV,
        example="EleutherAI/pythia-1b",
    ),
    _llama_shaped("llama", "llama", "meta-llama/Llama-3.2-1B"),
    _llama_shaped("mistral", "mistral", "mistralai/Mistral-7B-v0.1"),
    _llama_shaped("qwen2", "qwen2", "Qwen/Qwen2.5-0.5B"),
    _llama_shaped("qwen3", "qwen3", "Qwen/Qwen3-0.6B"),
    _llama_shaped("gemma", "gemma", "google/gemma-2b"),
    _llama_shaped("gemma2", "gemma2", "google/gemma-2-2b"),
    _llama_shaped("olmo", "olmo", "allenai/OLMo-1B-hf"),
    _llama_shaped("olmo2", "olmo2", "allenai/OLMo-2-0425-1B"),
    Family(
        name="phi",
        model_types=("phi",),
        layer_containers=("model.layers", "layers"),
        matrices={**_mlp("mlp", "fc1", "fc2"), **_attention("self_attn", "q_proj", "k_proj", "v_proj", "dense")},
        example="microsoft/phi-1_5",
    ),
    Family(
        name="phi3",
        model_types=("phi3",),
        layer_containers=("model.layers", "layers"),
        matrices={**_mlp("mlp", "gate_up_proj", "down_proj"), **_fused_attention("self_attn", "qkv_proj", "o_proj")},
        fused={**_FUSED_QKV, "mlp_up": "mlp_in"},
        example="microsoft/Phi-3-mini-4k-instruct",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        layer_containers=("transformer.h", "h"),
        matrices={**_mlp("mlp", "c_fc", "c_proj"), **_fused_attention("attn", "c_attn", "c_proj")},
        fused=_FUSED_QKV,
        example="openai-community/gpt2",
    ),
    Family(
        name="gpt-j",
        model_types=("gptj",),
        layer_containers=("transformer.h", "h"),
        matrices={**_mlp("mlp", "fc_in", "fc_out"), **_attention("attn", "q_proj", "k_proj", "v_proj", "out_proj")},
        example="EleutherAI/gpt-j-6b",
    ),
    Family(
        name="opt",
        model_types=("opt",),
        layer_containers=("model.decoder.layers", "decoder.layers", "layers"),
        matrices={**_mlp("", "fc1", "fc2"), **_attention("self_attn", "q_proj", "k_proj", "v_proj", "out_proj")},
        example="facebook/opt-125m",
    ),
    _bloom_shaped("falcon", "falcon", "tiiuae/falcon-7b"),
    _bloom_shaped("bloom", "bloom", "bigscience/bloom-560m"),
    _moe("mixtral", "mixtral", "mistralai/Mixtral-8x7B-v0.1"),
    _moe(
        "qwen2-moe",
        "qwen2_moe",
        "Qwen/Qwen1.5-MoE-A2.7B",
        extra=r"; its shared expert's linears can be selected by regex (model\.layers\.\d+\.mlp\.shared_expert\..*)",
    ),
    _moe("qwen3-moe", "qwen3_moe", "Qwen/Qwen3-30B-A3B"),
    Family(
        name="toy-transformer",  # fasttrunc.models.toy: the query is the identity, so qkv = key, value
        model_types=(),
        layer_containers=("blocks",),
        matrices={
            **_mlp("ff", "w1", "w2"),
            "attn_k": ("attn.wk",),
            "attn_v": ("attn.wv",),
            "attn_qkv": ("attn.wk", "attn.wv"),
            "attn_out": ("attn.wo",),
        },
        unsupported={"attn_q": "the toy transformer's query is the identity (it has no query matrix)"},
    ),
)


def _try_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) else None


def _module_names(family: Family) -> list[str]:
    """Every module name (relative to one block) that the row's aliases name, without repeats."""
    return list(dict.fromkeys(rel for rels in family.matrices.values() for rel in rels))


def _is_slot(module: nn.Module | None) -> bool:
    """A module of a supported kind, or one fasttrunc already swapped in for one."""
    # fasttrunc.linear imports this module; a TruncatedLinear exists only once it is imported.
    truncated = getattr(sys.modules.get("fasttrunc.linear"), "TruncatedLinear", None)
    return module_kind(module) is not None or (truncated is not None and isinstance(module, truncated))


def _layers_of(model: nn.Module, family: Family) -> tuple[str, int] | None:
    """``(path, n_layers)`` of the family's block list in ``model``, when its first block fits the row.

    A block fits when every module the row names is there, of a supported kind (or truncated).
    """
    for path in family.layer_containers:
        layers = _try_submodule(model, path)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        block = layers[0]
        if all(_is_slot(_try_submodule(block, rel)) for rel in _module_names(family)):
            return path, len(layers)
    return None


# --- matching a block by its module names ------------------------------------------------------

# The alias each well-known leaf name plays in a block. "qkv" and "gate_up" are fused matrices:
# attn_qkv whole, and mlp_in with mlp_up inside it.
_ROLE_BY_LEAF: dict[str, str] = {
    **dict.fromkeys(("q_proj", "query", "wq", "q_lin"), "attn_q"),
    **dict.fromkeys(("k_proj", "key", "wk", "k_lin"), "attn_k"),
    **dict.fromkeys(("v_proj", "value", "wv", "v_lin"), "attn_v"),
    **dict.fromkeys(("query_key_value", "qkv_proj", "c_attn", "qkv", "wqkv"), "qkv"),
    **dict.fromkeys(("o_proj", "out_proj", "out_lin"), "attn_out"),
    **dict.fromkeys(("gate_proj", "w1", "fc1", "fc_in", "dense_h_to_4h", "c_fc"), "mlp_in"),
    **dict.fromkeys(("up_proj", "w3"), "mlp_up"),
    **dict.fromkeys(("down_proj", "w2", "fc2", "fc_out", "dense_4h_to_h"), "mlp_out"),
    "gate_up_proj": "gate_up",
    # Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): a low-rank query (q_a then q_b, or
    # one q_proj) and a shared latent for keys and values (kv_a then kv_b).
    "q_a_proj": "q_a",
    "q_b_proj": "q_b",
    "kv_a_proj_with_mqa": "kv_a",
    "kv_b_proj": "kv_b",
}
_LATENT_KV = (
    "its attention is multi-head latent attention: keys and values both come from {kv} (a shared "
    "latent), so neither has matrices of its own; truncate them with 'attn_qkv' (which holds {kv} "
    "beside the query's) or select one of them by regex"
)
# Leaf names that are an output projection of whichever sub-module holds them (attention or MLP).
_OUTPUT_LEAVES = ("dense", "c_proj", "wo", "proj", "out")
_ATTENTION_WORDS = ("attn", "attention")
# Sub-modules of a decoder block that attend to an encoder's states (BART-style decoders): their
# linears play no alias, so the attention aliases name the block's self-attention.
_CROSS_ATTENTION = ("encoder_attn", "crossattention", "cross_attn")
# Sub-modules that mix tokens without softmax attention (state-space, linear-attention and
# recurrent mixers: Mamba's, Gated DeltaNet's, ...): their linears (in_proj, out_proj, ...) play no
# alias either, so a hybrid block's attention aliases name only its attention.
_OTHER_MIXERS = ("mamba", "ssm", "linear_attn", "rwkv")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")


def _context(rel: str) -> str | None:
    """Whether the sub-modules above ``rel`` put it in the attention ("attn") or the MLP ("mlp"), if they say."""
    parents = rel.lower().split(".")[:-1]
    attention = any(word in p for p in parents for word in _ATTENTION_WORDS)
    mlp = any(p == "ff" or any(word in p for word in _MLP_WORDS) for p in parents)
    if attention == mlp:
        return None
    return "attn" if attention else "mlp"


def _role(rel: str) -> str | None:
    """The alias a block's linear plays by its name, or None when the name does not say.

    A name the surrounding sub-module contradicts (a ``gate_proj`` inside the attention, a
    ``key`` inside the MLP) says nothing.
    """
    lowered = rel.lower()
    *parents, leaf = lowered.split(".")
    if leaf == "linear" and parents:  # a wrapper's one linear (Moshi's q_proj.linear): named by the wrapper
        *parents, leaf = parents
    if any(p in _CROSS_ATTENTION for p in parents):
        return None  # cross-attention: selectable by regex, never by an alias
    if any(word in p for p in parents for word in _OTHER_MIXERS):
        return None  # a state-space or linear-attention mixer: selectable by regex only
    context = _context(rel)
    if leaf in _OUTPUT_LEAVES and leaf not in _ROLE_BY_LEAF:
        if context is None and leaf == "dense":
            # BERT's layer (RoBERTa, ELECTRA, ...): intermediate.dense then output.dense is the MLP
            # (the attention's own output is attention.output.dense).
            return {"intermediate.dense": "mlp_in", "output.dense": "mlp_out"}.get(lowered)
        return {"attn": "attn_out", "mlp": "mlp_out", None: None}[context]
    role = _ROLE_BY_LEAF.get(leaf)
    if role is None or context is None:
        return role
    return role if (role.startswith("mlp") or role == "gate_up") == (context == "mlp") else None


class _NoRow(ValueError):
    """A block whose linears do not make one family row; the message says why."""


# A row read from a block's linear names: (matrices, fused, unsupported), as in Family.
_Reading = tuple[dict[str, tuple[str, ...]], dict[str, str], dict[str, str]]


def _block_linears(block: nn.Module) -> list[str]:
    return [rel for rel, m in block.named_modules() if rel and _is_slot(m)]


def _fused_experts(block: nn.Module) -> list[str]:
    """Names of parameters with three or more dimensions in the block's MLP or experts: experts
    fused into one tensor. A convolution's kernel (Mamba's conv1d) or a recurrent mixer's gates
    (RecurrentGemma's RG-LRU) elsewhere in the block are 3-D too, and are not experts."""
    return [
        name
        for name, p in block.named_parameters()
        if p.dim() >= 3 and (any(word in name.lower() for word in ("expert", "moe")) or _context(name) == "mlp")
    ]


def _claims(block: nn.Module, part: str | None = None) -> dict[str, str]:
    """Role -> the one linear of ``block`` that plays it by name, or _NoRow when two do.

    ``part`` ("attn" or "mlp") keeps only the roles of that part of the block.
    """
    claims: dict[str, list[str]] = {}
    for rel in _block_linears(block):
        role = _role(rel)
        if role is not None and (part is None or _part_of(role) == part):
            claims.setdefault(role, []).append(rel)
    doubled = {role: rels for role, rels in claims.items() if len(rels) > 1}
    if doubled:
        raise _NoRow(
            "; ".join(f"{len(rels)} linears look like {role} ({', '.join(rels)})" for role, rels in doubled.items())
        )
    one = {role: rels[0] for role, rels in claims.items()}
    if "mlp_up" in one and "mlp_in" not in one and "gate_up" not in one:
        one["mlp_in"] = one.pop("mlp_up")  # an ungated MLP named up/down: its up projection is its input
    return one


def _part_of(role: str) -> str:
    """The part of a block a role belongs to: "mlp" or "attn"."""
    return "mlp" if role.startswith("mlp") or role == "gate_up" else "attn"


def _attention_reading(one: dict[str, str]) -> _Reading:
    """The attention aliases of a block's claims (any MLP roles ignored), or _NoRow."""
    matrices: dict[str, tuple[str, ...]] = {}
    fused: dict[str, str] = {}
    unsupported: dict[str, str] = {}
    parts = [one[a] for a in QKV_PARTS if a in one]
    latent = [one[r] for r in ("q_a", "q_b", "kv_a", "kv_b") if r in one]
    if latent:
        query = [one[r] for r in ("q_a", "q_b") if r in one] or ([one["attn_q"]] if "attn_q" in one else [])
        kv = [one[r] for r in ("kv_a", "kv_b") if r in one]
        if len(kv) != 2 or len(query) not in (1, 2) or ("q_a" in one) != ("q_b" in one):
            raise _NoRow(f"only part of a latent attention is known by name ({', '.join(latent)})")
        if "qkv" in one or "attn_k" in one or "attn_v" in one:
            raise _NoRow(f"a latent attention ({', '.join(latent)}) beside separate key or value projections")
        matrices["attn_q"] = tuple(query)
        matrices["attn_qkv"] = (*query, *kv)
        unsupported = dict.fromkeys(("attn_k", "attn_v"), _LATENT_KV.format(kv=" and ".join(kv)))
    elif "qkv" in one:
        if parts:
            raise _NoRow(f"both a fused query-key-value ({one['qkv']}) and separate projections ({', '.join(parts)})")
        matrices["attn_qkv"] = (one["qkv"],)
        fused.update(_FUSED_QKV)
    elif len(parts) == len(QKV_PARTS):
        matrices.update({alias: (one[alias],) for alias in QKV_PARTS})
        matrices["attn_qkv"] = tuple(parts)
    elif parts:
        raise _NoRow(f"only some of the query, key and value projections are known by name ({', '.join(parts)})")
    if "attn_out" in one:
        matrices["attn_out"] = (one["attn_out"],)
    return matrices, fused, unsupported


def _mlp_reading(one: dict[str, str], experts: list[str]) -> _Reading:
    """The MLP aliases of a block's claims (any attention roles ignored), or _NoRow; with fused
    ``experts`` (3-D parameters) every MLP alias is refused, naming them."""
    if experts:  # a linear MLP beside fused experts (a shared expert) is not the block's MLP
        return {}, {}, _experts_unsupported(", ".join(experts))
    matrices: dict[str, tuple[str, ...]] = {}
    fused: dict[str, str] = {}
    if "gate_up" in one:
        if "mlp_in" in one or "mlp_up" in one:
            raise _NoRow(f"both a fused gate-up ({one['gate_up']}) and separate gate or up projections")
        matrices["mlp_in"] = (one["gate_up"],)
        fused["mlp_up"] = "mlp_in"
    matrices.update({alias: (one[alias],) for alias in ("mlp_in", "mlp_up", "mlp_out") if alias in one})
    return matrices, fused, {}


def _missing(reading: _Reading, wanted: tuple[str, ...]) -> None:
    missing = [alias for alias in wanted if alias not in reading[0] and alias not in reading[2]]
    if missing:
        raise _NoRow(f"no linear is known by name as {', '.join(missing)}")


def _matrices_by_name(block: nn.Module) -> _Reading:
    """``(matrices, fused, unsupported)`` of a row read from one block's linear names, or _NoRow."""
    one = _claims(block)
    attention = _attention_reading(one)
    mlp = _mlp_reading(one, _fused_experts(block))
    reading = _merged(attention, mlp)
    _missing(reading, ("attn_qkv", "attn_out", "mlp_in", "mlp_out"))
    return reading


def _merged(*readings: _Reading) -> _Reading:
    """One reading of a block's parts (its attention's and its MLP's)."""
    matrices: dict[str, tuple[str, ...]] = {}
    fused: dict[str, str] = {}
    unsupported: dict[str, str] = {}
    for part_matrices, part_fused, part_unsupported in readings:
        matrices.update(part_matrices)
        fused.update(part_fused)
        unsupported.update(part_unsupported)
    return matrices, fused, unsupported


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists whose items share one class and hold linears, longest first; or
    whose items are of several classes (Jamba's attention and Mamba layers), each holding
    linears. No item may be a linear itself.

    A list inside an item of another (experts inside a layer) is not a list of blocks. A list
    inside a vision, audio or speech tower (a multimodal model's) is not the language model's:
    it is left out while another list remains (and stays selectable by regex).
    """
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        # (a list of linears, as Gemma 3n's AltUp projections, is no list of blocks)
        and not any(_is_slot(item) for item in m)
        and any(_is_slot(x) for x in m.modules())
        and (len({type(item) for item in m}) == 1 or all(any(_is_slot(x) for x in item.modules()) for item in m))
    ]
    outer = [(name, m) for name, m in found if not any(name.startswith(f"{other}.") for other, _ in found if other)]
    if any(name == "" for name, _ in found):
        outer = [(name, m) for name, m in found if name == ""]
    text = [(name, m) for name, m in outer if not any(word in name.lower() for word in _OTHER_TOWERS)]
    return sorted(text or outer, key=lambda item: -len(item[1]))


# Words in the path of a multimodal model's non-text towers (vision_tower, visual, audio_tower, ...).
_OTHER_TOWERS = ("vision", "visual", "audio", "image", "speech")


# alias -> (the layers that hold it, what the others hold instead): see Family.only_in
_OnlyIn = dict[str, tuple[tuple[int, ...], str]]


def _read_blocks(path: str, layers: nn.ModuleList) -> tuple[_Reading, _OnlyIn]:
    """The row every block of ``layers`` reads as, or _NoRow (also when two blocks read differently
    in a way :func:`_mixed_blocks` does not read: see there)."""
    readings: list[_Reading] = []
    failure = None
    for index, block in enumerate(layers):
        try:
            readings.append(_matrices_by_name(block))
        except _NoRow as exc:
            failure = _NoRow(f"{path}.{index}: {exc}")
            break
    if failure is None:
        differing = next((i for i, reading in enumerate(readings) if reading != readings[0]), None)
        if differing is None:
            return readings[0], {}
        failure = _NoRow(f"its blocks differ: {path}.0 and {path}.{differing} do not hold the same linears")
    mixed = _mixed_blocks(path, layers)
    if mixed is None:
        raise failure
    return mixed


def layer_list(indices: Sequence[int]) -> str:
    """``layer 3``, ``layers 0-2`` (a run) or ``layers 0, 1, 3``."""
    indices = list(indices)
    if len(indices) == 1:
        return f"layer {indices[0]}"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"layers {indices[0]}-{indices[-1]}"
    return f"layers {', '.join(map(str, indices))}"


def _grouped(keyed: Iterable[tuple[tuple[str, ...], int]]) -> dict[tuple[str, ...], list[int]]:
    """Block indices grouped by a key (the names they hold), in first-seen order."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for key, index in keyed:
        groups.setdefault(key, []).append(index)
    return groups


def _holding(groups: Mapping[tuple[str, ...], list[int]], what: str = "{}") -> str:
    """``layers 0, 1, 3 hold conv.in_proj, conv.out_proj; layer 2 holds ...`` for groups of blocks
    (each group's names put in ``what``)."""
    return "; ".join(
        f"{layer_list(indices)} {'hold' if len(indices) > 1 else 'holds'} "
        f"{what.format(', '.join(rels)) if rels else 'no other linear'}"
        for rels, indices in groups.items()
    )


def _mixed_blocks(path: str, layers: nn.ModuleList) -> tuple[_Reading, _OnlyIn] | None:
    """The row of blocks whose attention or MLP is not in every block, each alias in the layers
    that hold it (``Family.only_in``, whose reason says what the other layers hold instead).

    A block's token mixer is an attention read by name, or linears without a query, key or value
    name (a state-space, convolution or recurrent mixer: Bamba, LFM2, RecurrentGemma, Qwen3.5,
    ...); its MLP is a linear MLP read by name, or fused experts (the dense first layers of many
    mixtures of experts, Jamba's alternation). Every attention that reads must read alike, and
    every linear MLP: then the attention aliases are in the layers with that attention and the
    MLP aliases in those with that MLP. Where no block's MLP is linear, the MLP aliases are
    refused as fused experts. Where no block's attention reads, or the attentions differ among
    themselves, the attention aliases are refused, naming what each layer holds, with a regex.

    None when a block has neither a linear MLP nor fused experts, when the linear MLPs differ,
    or when nothing would be readable; a block whose attention is only partly known by name (two
    query projections, a query without a key, ...) is ambiguous: _NoRow with that block's reason.
    """
    mlps: list[_Reading | None] = []  # None: fused experts
    attentions: list[_Reading | None] = []  # None: another token mixer
    experts_of: dict[int, list[str]] = {}
    unclear: _NoRow | None = None  # the first block whose attention is only partly known by name
    for index, block in enumerate(layers):
        experts = _fused_experts(block)
        if experts:
            experts_of[index] = experts
            mlps.append(None)
        else:
            try:
                mlp = _mlp_reading(_claims(block, "mlp"), [])
                _missing(mlp, ("mlp_in", "mlp_out"))
            except _NoRow:
                return None
            mlps.append(mlp)
        attention = None
        try:
            claims = _claims(block, "attn")
            # No query, key or value by name (at most an out_proj, as LFM2's convolution has):
            # another token mixer, not an attention.
            if set(claims) - {"attn_out"}:
                attention = _attention_reading(claims)
                _missing(attention, ("attn_qkv", "attn_out"))
        except _NoRow as exc:
            unclear = unclear or _NoRow(f"{path}.{index}: {exc}")
        attentions.append(attention)
    linear = [mlp for mlp in mlps if mlp is not None]
    if any(mlp != linear[0] for mlp in linear):
        return None
    readable = [attention for attention in attentions if attention is not None]
    if not linear and not readable:
        return None
    if unclear is not None:  # the rest reads, but a block's attention is ambiguous: say which
        raise unclear
    parts: list[_Reading] = []
    only_in: _OnlyIn = {}
    if not linear:  # fused experts in every block (named as the first block's)
        parts.append(({}, {}, _experts_unsupported(", ".join(next(iter(experts_of.values()))))))
    else:
        parts.append(linear[0])
        if experts_of:
            instead = _holding(_grouped((tuple(e), i) for i, e in experts_of.items()), "fused experts ({})")
            dense = tuple(i for i, mlp in enumerate(mlps) if mlp is not None)
            only_in.update(dict.fromkeys(linear[0][0], (dense, f"{instead} instead")))
    mlp_names = {rel for mlp in linear[:1] for rels in mlp[0].values() for rel in rels}
    groups = _grouped(  # blocks by their linears outside the MLP
        (tuple(rel for rel in _block_linears(block) if rel not in mlp_names), index)
        for index, block in enumerate(layers)
    )
    with_attention = [i for i, attention in enumerate(attentions) if attention is not None]
    if readable and all(attention == readable[0] for attention in readable):
        parts.append(readable[0])
        if len(with_attention) < len(layers):
            attention_names = {rel for rels in readable[0][0].values() for rel in rels}
            others = {rels: indices for rels, indices in groups.items() if not attention_names & set(rels)}
            only_in.update(dict.fromkeys(readable[0][0], (tuple(with_attention), f"{_holding(others)} instead")))
    else:
        what = "hold attentions that differ" if readable else "hold no attention known by name"
        reason = f"its blocks {what} ({_holding(groups)})"
        # The regex example names an attention where a block has one (the aliases refused are its).
        shown = with_attention or list(range(len(layers)))
        example = next(((rels[0], ix[0]) for rels, ix in groups.items() if rels and ix[0] in shown), None)
        if example is not None:
            reason += f": select those by regex, e.g. r'{re.escape(path)}\\.{example[1]}\\.{re.escape(example[0])}'"
        parts.append(({}, {}, dict.fromkeys((a for a in MATRIX_ALIASES if _part_of(a) == "attn"), reason)))
    reading = _merged(*parts)
    return (reading, only_in) if reading[0] else None  # no alias would apply (experts, attentions that differ)


def _family_by_names(model: nn.Module, model_type: str | None) -> tuple[Family, str, int]:
    """A row built on the fly from the longest list of blocks and its blocks' linear names."""
    lists = _block_lists(model)
    if not lists:
        raise _NoRow("it has no nn.ModuleList of blocks (items of one class) that holds linears")
    longest = [(name, m) for name, m in lists if len(m) == len(lists[0][1])]
    rows, reasons = [], []
    for path, layers in longest:
        try:
            rows.append((path, layers, _read_blocks(path, layers)))
        except _NoRow as exc:
            reasons.append(str(exc))  # every reason names the block (or blocks) it is about
    if len(rows) > 1:
        raise _NoRow(f"{len(rows)} lists of {len(longest[0][1])} blocks fit: {', '.join(p for p, _, _ in rows)}")
    if not rows:
        raise _NoRow("; ".join(reasons))
    path, layers, ((matrices, fused, unsupported), only_in) = rows[0]
    family = Family(
        name=model_type or type(layers[0]).__name__,
        model_types=() if model_type is None else (model_type,),
        layer_containers=(path,),
        matrices=matrices,
        fused=fused,
        unsupported=unsupported,
        only_in=only_in,
    )
    return family, path, len(layers)


# --- finding a model's row ---------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyMatch:
    """The row that fits a model, where its blocks are, and how the row was found.

    ``matched_by`` is ``"model_type"`` (a row lists ``config.model_type``), ``"module names"`` (a
    row built from the well-known names of the linears in the model's blocks) or ``"row layout"``
    (a row's block list and module names are all there); see :func:`find_family`.
    """

    family: Family
    path: str  # qualified name of the nn.ModuleList of blocks
    n_layers: int
    matched_by: str


def _no_family(model: nn.Module, model_type: str | None, reason: str) -> ValueError:
    known = ", ".join(f.name for f in FAMILIES)
    lists = [(path, layers) for path, layers in _block_lists(model) if _block_linears(layers[0])]
    if lists:
        path, layers = lists[0]
        rels = _block_linears(layers[0])
        shown = f"{path}.<i>.{{{', '.join(rels)}}}"
        example = f"{re.escape(path)}\\.\\d+\\.{re.escape(rels[0])}"
    else:
        linears = truncatable_names(model)
        shown = ", ".join(linears[:8]) + (f", ... ({len(linears)} in all)" if len(linears) > 8 else "")
        example = re.escape(linears[0]) if linears else ""
    how = "select its linears by regex or by a callable (name, module) -> bool instead"
    if example:
        how += f", e.g. truncate_(model, r'{example}', rank)"
    return ValueError(
        f"{type(model).__name__} (model_type {model_type!r}) matches no known model family ({known}) and "
        f"its blocks cannot be read by module names ({reason}); {how}; its linears: {shown or 'it has none'}"
    )


def find_family(model: nn.Module) -> FamilyMatch:
    """The family row that fits ``model``: by ``config.model_type``, else by structure.

    A row that lists the model's ``config.model_type`` comes first. Otherwise a row is built on
    the fly ("module names"): the longest outermost ``nn.ModuleList`` whose items share one
    class is the list of blocks, and every block's linears are classified by well-known names
    (``q_proj``, ``c_attn``, ``dense``, ``fc1``, ``gate_proj``, ``w1``, ...); the blocks must
    agree. Failing that, a row that lists no model type (the toy transformer's) whose block list
    and modules are all found ("row layout"); a row made for other model types is never guessed
    for a model whose blocks read ambiguously. When nothing fits, a one-line ValueError that
    lists the model's linears and says how to select them by regex or callable instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    model_type = _model_type(model)
    for family in FAMILIES:
        if model_type in family.model_types:
            found = _layers_of(model, family)
            if found is not None:
                return FamilyMatch(family, found[0], found[1], "model_type")
    try:
        family, path, n_layers = _family_by_names(model, model_type)
        return FamilyMatch(family, path, n_layers, "module names")
    except _NoRow as exc:
        reason = str(exc)
    for family in FAMILIES:
        found = None if family.model_types else _layers_of(model, family)
        if found is not None:
            return FamilyMatch(family, found[0], found[1], "row layout")
    raise _no_family(model, model_type, reason)


def detect_family(model: nn.Module) -> tuple[Family, str, int]:
    """The family row that fits ``model``, the path of its block list, and its number of blocks.

    See :func:`find_family`, which also says how the row was found.
    """
    match = find_family(model)
    return match.family, match.path, match.n_layers


def layer_aliases(
    family: Family, matrices: str | Sequence[str], layers: Sequence[int], every_layer: bool = False
) -> list[tuple[int, list[str]]]:
    """Per layer of ``layers`` (indices from 0), the aliases of ``matrices`` its block holds.

    Where a family's alias is only in some layers (``Family.only_in``): an alias named by itself
    must be in every layer asked for, and a group gives each layer the members it holds; a layer
    that holds none is an error, unless ``every_layer`` (the layers were not chosen one by one:
    ``Targets(layers=None)``), where it is left out. Errors are one-line ValueErrors naming the
    layers that hold the alias.
    """
    aliases = expand_matrices(matrices, family)
    named = {m for m in ([matrices] if isinstance(matrices, str) else matrices) if m not in MATRIX_GROUPS}
    out: list[tuple[int, list[str]]] = []
    for layer in layers:
        here = []
        for alias in aliases:
            if family.in_layer(alias, layer):
                here.append(alias)
            elif alias in named:
                raise family.not_in_layer(alias, layer)
        if here:
            out.append((layer, here))
        elif not every_layer:
            raise family.not_in_layer(aliases[0], layer)
    return out


def expand_matrices(matrices: str | Sequence[str], family: Family | None = None) -> list[str]:
    """Single aliases from aliases and groups, in order, without repeats.

    With ``family``, a group expands to the members the family has (``mlp`` on GPT-NeoX is
    ``mlp_in, mlp_out``), and a single alias the family lacks is a ValueError naming what it has.
    """
    if isinstance(matrices, str):
        names = [matrices]
    elif isinstance(matrices, Sequence) and all(isinstance(m, str) for m in matrices):
        names = list(matrices)
    else:
        raise ValueError(f"matrices {matrices!r} must be an alias, a group, or a list of them")
    if not names:
        raise ValueError("matrices is empty; give at least one alias")
    allowed = MATRIX_ALIASES + tuple(MATRIX_GROUPS)
    out: list[str] = []
    for name in names:
        if name not in allowed:
            here = allowed if family is None else family.aliases() + tuple(MATRIX_GROUPS)
            raise ValueError(f"matrix {name!r} is not known; allowed: {', '.join(here)}")
        if name in MATRIX_GROUPS:
            members = [a for a in MATRIX_GROUPS[name] if family is None or a in family.matrices]
            if not members and family is not None:
                for alias in MATRIX_GROUPS[name]:
                    family.names_for(alias)  # raises: unsupported (with why), or fused, or absent
        else:
            if family is not None:
                family.names_for(name)  # raises for an alias the family lacks
            members = [name]
        out.extend(a for a in members if a not in out)
    return out
