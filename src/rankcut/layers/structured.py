"""Common base of the factorized layers that are not one low-rank product.

Parameter-count convention (every structured layer follows it, and ``num_params``
counts exactly what the layer's state dict holds):

- every stored *value* (a floating-point element: factors, sparse values, bias) counts 1;
- *index* tensors (integer buffers: sparse positions, selected rows/columns) count in
  units of a float32 value, i.e. by their bytes / 4: an ``int32`` index costs 1, an
  ``int16`` index 1/2, a ``uint8`` index 1/4; a layer's total index cost is rounded up
  to a whole parameter. Indices use the smallest integer type that holds their range.

For a model kept in float32 (rankcut's default) this is the layer's size in bytes / 4.

The budget a structure may spend is given as a *rank* ``r`` by the allocators: an
``m x n`` matrix at rank ``r`` may store ``r (m + n)`` parameters (what a rank-``r``
``LowRankLinear`` costs), so every allocator and the global ratio apply unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .linear import Rebuildable, linear_from

#: Bytes of the unit in which index storage is counted (a float32 parameter).
UNIT_BYTES = 4


def index_dtype(limit: int) -> torch.dtype:
    """Smallest integer dtype holding values in ``[0, limit)``."""
    if limit <= 256:
        return torch.uint8
    if limit <= 2**15:
        return torch.int16
    return torch.int32


def index_cost(count: int, limit: int) -> float:
    """Cost, in float32 parameters, of ``count`` indices with values in ``[0, limit)``."""
    return count * torch.empty((), dtype=index_dtype(limit)).element_size() / UNIT_BYTES


class StructuredLinear(Rebuildable, nn.Module):
    """Base of structured replacements for a dense ``(out, in)`` linear layer.

    Subclasses define ``_forward(x)`` (without bias; never storing the dense weight,
    and building it only transiently where that costs fewer multiply-adds, as
    ``KroneckerLinear`` does for large batches), ``weight_product()`` (the dense matrix)
    and ``structure_fields`` (see ``Rebuildable``). The ``rank`` attribute is the *budget
    rank* the allocator gave: the layer stores at most about ``rank (in + out)``
    parameters (see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device, dtype):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # -- subclass hooks ---------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def weight_product(self) -> Tensor:
        """The dense ``(out, in)`` matrix this layer applies (analysis, ``to_linear``)."""
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        y = self._forward(x)
        return y + self.bias if self.bias is not None else y

    def set_bias(self, bias: Tensor | None) -> StructuredLinear:
        """Copy ``bias`` into the layer (which must have been built with ``bias=True``)."""
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)
        return self

    def index_params(self) -> int:
        """Index storage in float32-parameter units, rounded up (see the module docstring)."""
        nbytes = sum(
            b.numel() * b.element_size() for b in self.buffers() if not b.is_floating_point()
        )
        return math.ceil(nbytes / UNIT_BYTES)

    def num_params(self) -> int:
        """Values (parameters, bias included) plus index storage."""
        return sum(p.numel() for p in self.parameters()) + self.index_params()

    def dense_params(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return self.in_features * self.out_features + bias

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear``."""
        return linear_from(self.weight_product(), self.bias)

    def has_bias(self) -> bool:
        return self.bias is not None

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self._structure().items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, {fields}, params={self.num_params()}"
        )
