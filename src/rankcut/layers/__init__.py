"""Factorized layers as real ``nn.Module``s, on one contract (``FactorizedLinear``), and a
registry (``LAYER_TYPES``, filled by ``register_layer``) to rebuild them on load."""

from .base import LAYER_TYPES, FactorizedLinear, factorized_modules, register_layer
from .linear import dense_shape, dense_weight, is_dense_linear

# Registration order is the order of LAYER_TYPES: LowRankLinear first, as before.
from .lowrank import LowRankLinear  # isort: skip
from .cur import CURLinear
from .kronecker import KroneckerLinear
from .sparse import SparseDenseLinear, SparseLowRankLinear
from .structured import StructuredLinear
from .trainable import MaestroLinear, SLTrainLinear, lowrank_from_scratch

__all__ = [
    "LAYER_TYPES",
    "CURLinear",
    "FactorizedLinear",
    "KroneckerLinear",
    "LowRankLinear",
    "MaestroLinear",
    "SLTrainLinear",
    "SparseDenseLinear",
    "SparseLowRankLinear",
    "StructuredLinear",
    "dense_shape",
    "dense_weight",
    "factorized_modules",
    "is_dense_linear",
    "lowrank_from_scratch",
    "register_layer",
]
