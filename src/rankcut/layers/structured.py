"""Common base of the factorized layers that are not one low-rank product.

They hold their factors as plain parameters and their bias on themselves, store their
indices in the smallest integer type that holds them (counted as index storage, see
``rankcut.layers.base``), and take their size from a budget: an allocator gives a
*rank* ``r``, and an ``m x n`` matrix at rank ``r`` may store ``r (m + n)`` parameters
(what a rank-``r`` ``LowRankLinear`` costs), so every allocator and the global ratio
apply unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import UNIT_BYTES, FactorizedLinear


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


class StructuredLinear(FactorizedLinear):
    """Base of structured replacements for a dense ``(out, in)`` linear layer.

    Subclasses define ``_forward(x)`` (without bias), ``weight_product()``, ``macs()``
    and ``structure_fields``; this class holds the bias (as ``self.bias``) and adds it.
    Their factors are plain parameters, not modules, so they have no
    ``adapter_targets``: recovery trains them directly.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device, dtype):
        super().__init__(in_features, out_features, rank)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self._forward(x)
        return y + self.bias if self.bias is not None else y

    def set_bias(self, bias: Tensor | None) -> StructuredLinear:
        """Copy ``bias`` into the layer (which must have been built with ``bias=True``)."""
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)
        return self
