"""Truncation-aware data whitening (SVD-LLM, Wang et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from ..decompose import whitened_factors
from .base import MethodConfig, register_method


@dataclass
class SvdLlmConfig(MethodConfig):
    """Whiten with the Cholesky factor ``S`` of ``X^T X``; ``W' = [W S]_r S^-1``.

    Minimizes the layer's output error ``||(W - W') X^T||_F`` on the calibration data.

    Attributes:
        eps: relative diagonal shift used when ``X^T X`` is not positive definite.
    """

    eps: float = 1e-6
    positive_fields = ("eps",)


@register_method(
    "svd-llm",
    SvdLlmConfig,
    needs=("gram",),
    summary="truncation-aware whitening with the Cholesky factor of X^T X (SVD-LLM)",
)
def svd_llm(weight, stats, rank, config, name):
    inputs = stats.inputs
    chol = inputs.cholesky(config.eps, name).to(weight.device)
    return whitened_factors(weight, chol, rank)
