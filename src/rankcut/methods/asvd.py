"""Activation-aware SVD (ASVD, Yuan et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from ..decompose import column_scaled_factors
from ..errors import ConfigError
from .base import MethodConfig, register_method


@dataclass
class AsvdConfig(MethodConfig):
    """Scale input channels by ``(mean |x_j|)^alpha``, truncate the SVD, unscale.

    Attributes:
        alpha: exponent of the activation magnitude (0.5 in the ASVD paper).
        eps: floor on the scale, relative to its mean, so dead channels stay invertible.
    """

    alpha: float = 0.5
    eps: float = 1e-6
    positive_fields = ("eps",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 2.0:
            raise ConfigError(f"alpha must be in [0, 2], got {self.alpha}")


@register_method(
    "asvd",
    AsvdConfig,
    needs=("abs_mean",),
    summary="activation-aware SVD: input channels scaled by mean|x|^alpha (ASVD)",
)
def asvd(weight, stats, rank, config, name):
    scale = stats.inputs.abs_mean.pow(config.alpha)
    scale = scale.clamp_min(config.eps * float(scale.mean()) + 1e-30)
    return column_scaled_factors(weight, scale, rank)
