"""``TruncatedLinear``: an ``nn.Linear`` drop-in that holds rank-r factors of its weight."""

from __future__ import annotations

import math

import torch
from torch import nn

from fasttrunc import checks
from fasttrunc.checks import show
from fasttrunc.families import kind_names, module_kind
from fasttrunc.kernels.lowrank import lowrank_linear
from fasttrunc.kernels.lowrank_plan import LowrankTunables
from fasttrunc.ranks import Rank, resolve_rank
from fasttrunc.runs import compute_dtype
from fasttrunc.svd import check_matrix, check_method, truncated_svd

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_factor(name: str, t: object, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions; got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: float32, float64, float16, bfloat16")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device and holds no values")
    return t


# A size beyond 2**31 - 1 is a mistake, not a layer: one such row alone would hold 8 GiB in fp32.
MAX_FEATURES = 2**31 - 1


def _check_device(device: object) -> None:
    """None, a device name, index or ``torch.device`` that tensors can be created on."""
    if device is None:
        return
    if isinstance(device, bool) or not isinstance(device, str | int | torch.device):
        raise TypeError(f"device must be a torch.device, a device name such as 'cpu', or None; got {show(device)}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"device {show(device)} is not usable here: {reason[:160]}") from None


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {show(value)}")
    return value


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
        self.in_features = checks.integer("in_features", in_features, 1, MAX_FEATURES)
        self.out_features = checks.integer("out_features", out_features, 1, MAX_FEATURES)
        _check_flag("bias", bias)
        _check_device(device)
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"dtype {dtype!r} is not a floating-point dtype; allowed: float32, float64, float16, bfloat16"
            )
        r = resolve_rank(rank, self.out_features, self.in_features)
        self.a = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.method: str | None = None
        # The low-rank kernels' planner settings for this layer's calls (None: the defaults), e.g.
        # LowrankTunables(cost_model=load_cost_model("calibration.json")) on a calibrated GPU.
        self.tunables: LowrankTunables | None = None
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
        compute = compute_dtype(self.a.dtype)
        return (self.b.to(compute) @ self.a.to(compute)).to(self.a.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.a, self.b, self.bias, tunables=self.tunables)

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
        requires_grad: bool = True,
    ) -> TruncatedLinear:
        """Build from the top-r triplets ``u (out, r)``, ``s (r,)``, ``vh (r, in)``.

        The factors are computed in fp32 (fp64 for fp64 input) and stored in ``dtype`` (default
        ``u.dtype``); ``requires_grad`` applies to the factors and the bias.
        """
        u, s, vh = _check_factor("u", u, 2), _check_factor("s", s, 1), _check_factor("vh", vh, 2)
        out_features, r = u.shape
        if s.shape[0] != r or vh.shape[0] != r:
            raise ValueError(
                f"u {tuple(u.shape)}, s {tuple(s.shape)} and vh {tuple(vh.shape)} do not agree on a rank; "
                "expected u (out, r), s (r,), vh (r, in)"
            )
        in_features = vh.shape[1]
        if out_features == 0 or in_features == 0 or r > min(out_features, in_features):
            raise ValueError(
                f"u {tuple(u.shape)} and vh {tuple(vh.shape)} give a {out_features}x{in_features} matrix of rank {r}; "
                "expected out >= 1, in >= 1 and r <= min(out, in)"
            )
        for name, t in (("u", u), ("s", s), ("vh", vh)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
        if bool((s < 0).any()):
            raise ValueError("s has negative entries; singular values are >= 0")
        if bias is not None:
            _check_factor("bias", bias, 1)
            if bias.shape[0] != out_features:
                raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({out_features},) to match u")
        if method is not None:
            check_method(method)
        _check_flag("requires_grad", requires_grad)
        dtype = u.dtype if dtype is None else dtype
        module = cls(in_features, out_features, r, bias=bias is not None, device=u.device, dtype=dtype)
        compute = compute_dtype(s.dtype)
        root = s.to(compute).sqrt()
        with torch.no_grad():
            module.a.copy_(root[:, None] * vh.to(compute))
            module.b.copy_(u.to(compute) * root[None, :])
            if bias is not None:
                module.bias.copy_(bias.detach())
        module.requires_grad_(requires_grad)
        module.method = method
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: Rank, method: str = "exact", **svd_options) -> TruncatedLinear:
        """The rank-``rank`` approximation of ``linear`` (Eckart-Young optimal for ``exact``).

        ``linear`` is any module kind fasttrunc knows (``nn.Linear`` and its subclasses,
        transformers' ``Conv1D``); the factors and bias keep its dtype, device and ``requires_grad``.
        """
        kind = module_kind(linear)
        if kind is None:
            raise TypeError(
                f"linear must be a module of a kind fasttrunc truncates ({kind_names()}); got {show(linear)}"
            )
        check_method(method)
        weight = check_matrix(kind.weight(linear), "linear.weight", finite=True)
        u, s, vh = truncated_svd(weight, rank, method=method, dtype=compute_dtype(weight.dtype), **svd_options)
        bias = kind.bias(linear)
        return cls.from_svd(
            u,
            s,
            vh,
            bias=None if bias is None else bias.detach(),
            method=method,
            dtype=weight.dtype,
            requires_grad=kind.parameter(linear).requires_grad,
        )

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
