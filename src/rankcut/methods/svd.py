"""Plain truncated SVD of the weight (LoRD): no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

from ..decompose import svd_factors
from .base import MethodConfig, register_method


@dataclass
class SvdConfig(MethodConfig):
    """Truncated SVD, ``W ~= U_r S_r V_r^T``: minimizes ``||W - W'||_F`` (Eckart-Young)."""


@register_method("svd", SvdConfig, needs=(), summary="truncated SVD of the weight (LoRD); no data")
def svd(weight, stats, rank, config, name):
    return svd_factors(weight, rank)
