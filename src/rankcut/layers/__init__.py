"""Factorized layers as real ``nn.Module``s, and a registry to rebuild them on load."""

from .cur import CURLinear
from .kronecker import KroneckerLinear
from .linear import dense_shape, dense_weight, is_dense_linear
from .lowrank import LowRankLinear
from .sparse import SparseDenseLinear, SparseLowRankLinear
from .structured import StructuredLinear

#: Layer types that ``rankcut.load`` can rebuild from ``rankcut.json``, by class name.
LAYER_TYPES: dict[str, type] = {"LowRankLinear": LowRankLinear}
for _cls in (CURLinear, KroneckerLinear, SparseLowRankLinear, SparseDenseLinear):
    LAYER_TYPES[_cls.__name__] = _cls


def factorized_modules(model):
    """``(name, module)`` for every factorized layer in ``model``."""
    types = tuple(LAYER_TYPES.values())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


__all__ = [
    "LAYER_TYPES",
    "CURLinear",
    "KroneckerLinear",
    "LowRankLinear",
    "SparseDenseLinear",
    "SparseLowRankLinear",
    "StructuredLinear",
    "dense_shape",
    "dense_weight",
    "factorized_modules",
    "is_dense_linear",
]
