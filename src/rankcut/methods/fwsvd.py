"""Fisher-weighted SVD (FWSVD, Hsu et al. 2022).

Axis: the Fisher information ``F_ij = E[(dL/dW_ij)^2]`` is summed over output rows into
one weight per *input* channel, ``d_j = sqrt(sum_i F_ij)``, and the SVD of ``W diag(d)``
is truncated. Why input channels: (1) it is the paper's choice (their ``W`` is stored
``(in, out)`` and they sum each row, i.e. each input dimension); (2) with weights on one
axis the weighted problem ``min ||(W - W') D||_F`` is solved exactly by an SVD, which a
full elementwise weighting is not; (3) it matches ASVD and SVD-LLM, which also reweight
input channels, so the three differ only in what they measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decompose import column_scaled_factors
from .base import MethodConfig, register_method


@dataclass
class FwsvdConfig(MethodConfig):
    """Weight input channels by the square root of their summed Fisher information.

    Attributes:
        eps: floor on the weights, relative to their mean (channels with no gradient).
    """

    eps: float = 1e-6
    positive_fields = ("eps",)


def fisher_scale(fisher_in: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt`` of the per-input-channel Fisher, floored so that it can be inverted."""
    scale = fisher_in.to(torch.float64).clamp_min(0).sqrt()
    return scale.clamp_min(eps * float(scale.mean()) + 1e-30)


@register_method(
    "fwsvd",
    FwsvdConfig,
    needs=("fisher",),
    summary="Fisher-weighted SVD: input channels weighted by sqrt of summed squared grads (FWSVD)",
)
def fwsvd(weight, stats, rank, config, name):
    return column_scaled_factors(weight, fisher_scale(stats.fisher_in, config.eps), rank)
