"""The two-layer toy transformer of the noisy in-context recall experiment (PAPER.md 1a).

Token embeddings, positional embeddings and the unembedding are random and frozen (buffers, so
they travel in the state dict but get no gradient); the unembedding's init is ``unembed_init``
(:data:`UNEMBED_INITS`). Each block is ``h = x + Attn(x)``,
``out = h + FF(h)``: single-head causal attention whose query is the identity (trainable key,
value and output maps ``attn.wk``, ``attn.wv``, ``attn.wo``) and a ReLU MLP ``ff.w1``
(d -> d_ff), ``ff.w2`` (d_ff -> d); no biases, no LayerNorm. These names are the
``toy-transformer`` row of :data:`fasttrunc.truncation.FAMILIES`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fasttrunc import checks

# The frozen unembedding's entries. "paper": U(-1/sqrt(d), 1/sqrt(d)), nn.Linear's default init,
# which the paper's reference code leaves in place (standard deviation 1/sqrt(3d)). "normal":
# N(0, 1/d), sqrt(3) times larger: logits start larger and the toy learns faster (README,
# "Fidelity").
UNEMBED_INITS = ("normal", "paper")


class Attention(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, capture: dict | None = None, prefix: str = "") -> torch.Tensor:
        t = x.shape[1]
        scores = x @ self.wk(x).transpose(1, 2) / math.sqrt(x.shape[-1])  # query = x itself
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        if capture is not None:
            capture[prefix + "attn"] = weights
        return self.wo(weights @ self.wv(x))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.relu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.attn = Attention(d_model)
        self.ff = FeedForward(d_model, d_ff)

    def forward(
        self, x: torch.Tensor, capture: dict | None = None, prefix: str = "", keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = x + self.attn(x, capture, prefix)
        if keep is not None:  # FF only where the output is read: (B, T, d) -> (n_kept, d)
            h = h[keep]
        if capture is not None:
            capture[prefix + "ff_in"] = h
        return h + self.ff(h)


class ToyTransformer(nn.Module):
    """``forward(tokens (B, T)) -> logits (B, T, vocab_size)``.

    ``capture``, a dict, receives ``blocks.{i}.attn`` (attention weights ``(B, T, T)``) and
    ``blocks.{i}.ff_in`` (the residual stream entering FF ``i``), for probes.
    ``keep``, a ``(B, T)`` bool mask, makes :meth:`residual` return only the kept positions
    ``(n_kept, d)``; the last FF then runs on those positions alone (it affects nothing else).
    """

    embed: torch.Tensor
    pos: torch.Tensor
    unembed: torch.Tensor
    blocks: nn.ModuleList

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        d_ff: int,
        max_len: int,
        n_layers: int = 2,
        seed: int = 0,
        unembed_init: str = "normal",
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("vocab_size", vocab_size, 2),
            ("d_model", d_model, 1),
            ("d_ff", d_ff, 1),
            ("max_len", max_len, 1),
            ("n_layers", n_layers, 1),
        ):
            checks.integer(name, value, low)
        checks.choice("init", unembed_init, UNEMBED_INITS)
        self.vocab_size, self.d_model, self.d_ff, self.max_len = vocab_size, d_model, d_ff, max_len
        g = torch.Generator().manual_seed(seed)
        # Input embeddings and positions with N(0, 1) entries (norm ~ sqrt(d), nearly orthogonal),
        # as the paper's reference model (nn.Embedding's default). The unembedding: see UNEMBED_INITS.
        self.register_buffer("embed", torch.randn(vocab_size, d_model, generator=g))
        self.register_buffer("pos", torch.randn(max_len, d_model, generator=g))
        if unembed_init == "paper":
            unembed = (2 * torch.rand(vocab_size, d_model, generator=g) - 1) / math.sqrt(d_model)
        else:
            unembed = torch.randn(vocab_size, d_model, generator=g) / math.sqrt(d_model)
        self.register_buffer("unembed", unembed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.blocks = nn.ModuleList(Block(d_model, d_ff) for _ in range(n_layers))

    def residual(
        self, tokens: torch.Tensor, capture: dict | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (batch, seq) long tensor; got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.max_len}")
        x = self.embed[tokens] + self.pos[: tokens.shape[1]]
        if keep is not None and (keep.shape != tokens.shape or keep.dtype != torch.bool):
            raise ValueError(
                f"keep must be a bool mask of shape {tuple(tokens.shape)}; got {tuple(keep.shape)} {keep.dtype}"
            )
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, capture, f"blocks.{i}.", keep if i == last else None)
        return x

    def logits_of(self, residual: torch.Tensor) -> torch.Tensor:
        return residual @ self.unembed.T

    def forward(
        self, tokens: torch.Tensor, capture: dict | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.logits_of(self.residual(tokens, capture, keep))
