"""``TruncatedLinear``: an ``nn.Linear`` drop-in that holds rank-r factors of its weight."""

from __future__ import annotations

import math

import torch
from torch import nn

from fasttrunc.kernels.lowrank import lowrank_linear
from fasttrunc.ranks import resolve_rank
from fasttrunc.svd import check_method, truncated_svd


class TruncatedLinear(nn.Module):
    """``y = x @ (b @ a).T + bias`` with ``a`` of shape ``(rank, in)`` and ``b`` ``(out, rank)``.

    Built from an SVD, the singular values are split evenly: ``a = S^1/2 Vh``, ``b = U S^1/2``.
    ``rank`` follows fasttrunc's rank rules; rank 0 is legal and leaves only the bias.
    ``method`` records how the factors were computed (``"exact"``, ``"randomized"``, or
    ``None`` for factors that were initialised or set by hand).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | float,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        r = resolve_rank(rank, self.out_features, self.in_features)
        factory = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.b = nn.Parameter(torch.empty(self.out_features, r, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.method: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's init for the product: a ~ U(+-1/sqrt(in)), b ~ U(+-1/sqrt(r)).
        if self.rank > 0:
            bound_a = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            nn.init.uniform_(self.a, -bound_a, bound_a)
            nn.init.uniform_(self.b, -1.0 / math.sqrt(self.rank), 1.0 / math.sqrt(self.rank))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense effective weight ``b @ a`` (out, in), computed in fp32 and cast back."""
        compute = torch.float64 if self.a.dtype == torch.float64 else torch.float32
        return (self.b.to(compute) @ self.a.to(compute)).to(self.a.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.a, self.b, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}/{self.max_rank}, bias={self.bias is not None}, method={self.method}"
        )

    @classmethod
    def from_svd(
        cls,
        u: torch.Tensor,
        s: torch.Tensor,
        vh: torch.Tensor,
        bias: torch.Tensor | None = None,
        method: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TruncatedLinear:
        """Build from the top-r triplets ``u (out, r)``, ``s (r,)``, ``vh (r, in)``."""
        dtype = dtype or u.dtype
        out_features, r = u.shape
        in_features = vh.shape[1]
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = in_features, out_features
        compute = torch.float64 if s.dtype == torch.float64 else torch.float32
        root = s.to(compute).clamp_min(0).sqrt()
        module.a = nn.Parameter((root[:, None] * vh.to(compute)).to(dtype).contiguous())
        module.b = nn.Parameter((u.to(compute) * root[None, :]).to(dtype).contiguous())
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone().to(dtype))
        else:
            module.register_parameter("bias", None)
        module.method = method
        assert module.rank == r
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | float, method: str = "exact", **svd_options) -> TruncatedLinear:
        """The rank-``rank`` approximation of ``linear`` (Eckart-Young optimal for ``exact``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear; got {type(linear).__name__}")
        check_method(method)
        weight = linear.weight.detach()
        u, s, vh = truncated_svd(weight, rank, method=method, **svd_options)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_svd(u, s, vh, bias=bias, method=method, dtype=weight.dtype)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with weight ``b @ a`` and the same bias, device and dtype."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.a.device,
            dtype=self.a.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear
