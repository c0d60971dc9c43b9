"""``LowRankLinear``: a linear layer stored as two factors, ``y = up(down(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .base import FactorizedLinear, register_layer
from .linear import dense_weight


@register_layer
class LowRankLinear(FactorizedLinear):
    """A rank-``r`` replacement for a dense ``(out, in)`` linear layer.

    Holds ``down`` (``in -> r``, no bias) and ``up`` (``r -> out``, carrying the
    original bias) as ``nn.Linear`` submodules, so adapters (LoRA) and optimizers see
    ordinary layers (they are its ``adapter_targets``). ``forward`` applies the two
    factors in turn and never rebuilds the dense weight: it costs ``r (in + out)``
    multiply-adds per token instead of ``in * out``.

    Example:
        >>> import torch
        >>> dense = torch.nn.Linear(8, 6)
        >>> lr = LowRankLinear.from_linear(dense, rank=6)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(lr(x), dense(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank)
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self._decode_layout()
        # Loading with assign=True (rankcut.load) installs the saved, contiguous tensors:
        # lay them out again afterwards. (A module-level function, not a lambda, so that
        # the layer still pickles: torch.save(model), multiprocessing.)
        self.register_load_state_dict_post_hook(_decode_layout_after_load)

    def _decode_layout(self) -> None:
        for factor in (self.down, self.up):
            if isinstance(factor, nn.Linear):
                decode_layout(factor)

    @classmethod
    def from_factors(
        cls,
        up: Tensor,
        down: Tensor,
        bias: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """Build from ``up`` ``(out, r)`` and ``down`` ``(r, in)`` (cast to ``dtype``)."""
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"incompatible factors {tuple(up.shape)} @ {tuple(down.shape)}")
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        layer = cls(
            down.shape[1], up.shape[0], up.shape[1], bias is not None, device=up.device, dtype=dtype
        )
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int) -> LowRankLinear:
        """Truncated-SVD replacement of an ``nn.Linear`` or HF ``Conv1D``."""
        from ..decompose import svd_factors

        weight = dense_weight(linear).detach()
        up, down = svd_factors(weight, rank)
        return cls.from_factors(up, down, linear.bias, dtype=weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        down, up = self.down, self.up
        if _plain(down) and _plain(up):
            if x.numel() == self.in_features:
                # One token (decoding): two matrix-vector products, which skip the
                # reshaping and GEMM set-up of F.linear (measured 8% faster overall on
                # SmolLM2's decoder linears, 2x on the small k/v projections).
                y = torch.mv(up.weight, torch.mv(down.weight, x.reshape(-1)))
                y = y if up.bias is None else y + up.bias
                return y.reshape(*x.shape[:-1], self.out_features)
            # Two functional calls instead of two module calls: at batch-1 decode on
            # small matrices the module-call overhead is as large as the arithmetic.
            return F.linear(F.linear(x, down.weight), up.weight, up.bias)
        return up(down(x))  # wrapped (e.g. a LoRA adapter) or hooked factors

    @property
    def bias(self) -> Tensor | None:
        """The bias, held by the ``up`` factor (so ``up`` is an ordinary biased linear)."""
        return self.up.bias

    def weight_product(self) -> Tensor:
        """The dense ``(out, in)`` matrix ``up @ down`` (for analysis, not for forward)."""
        return self.up.weight @ self.down.weight

    def macs(self, tokens: int) -> int:
        """``tokens r (in + out)``: one product with each factor, at any batch size.

        Example:
            >>> LowRankLinear(8, 6, rank=2).macs(tokens=1)
            28
        """
        return tokens * self.rank * (self.in_features + self.out_features)

    def adapter_targets(self) -> dict[str, nn.Module]:
        """The two factors, ``down`` and ``up``: ordinary ``nn.Linear`` modules."""
        return {"down": self.down, "up": self.up}


def decode_layout(linear: nn.Linear) -> None:
    """Store ``linear.weight`` (``out x in``) column-major when ``out > in``.

    One token at a time (decoding), a linear layer streams its weight from memory once
    per token, and how fast depends on the layout: on the 2-core CPU of the speed
    benchmark a ``1536 x 336`` matrix took 240 us row-major and 138 us column-major,
    a ``336 x 1536`` one 140 us row-major and 242 us column-major
    (``benchmarks/results/decode_layout.md``). So wide-output matrices, such as the ``up``
    factor of a low-rank layer, keep their transpose contiguous. The weight keeps its
    logical shape: state dicts, optimizers and adapters see an ordinary
    ``(out, in)`` parameter, and saving writes it contiguous.
    """
    weight = linear.weight
    out_features, in_features = weight.shape
    if out_features > in_features and weight.stride() == (in_features, 1):
        column_major = weight.detach().t().contiguous().t()
        linear.weight = nn.Parameter(column_major, requires_grad=weight.requires_grad)


def _decode_layout_after_load(module: LowRankLinear, incompatible_keys) -> None:
    module._decode_layout()


def _plain(m: nn.Module) -> bool:
    """``m`` is a bare ``nn.Linear`` whose call would run no hook (so ``F.linear`` on its
    weight is exactly the module call)."""
    return (
        type(m) is nn.Linear
        and not (m._forward_hooks or m._forward_pre_hooks)
        and not (m._backward_hooks or m._backward_pre_hooks)
        and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
    )
