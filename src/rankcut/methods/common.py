"""Not a method: what the structured methods (``cur``, ``kronecker``, ``svd-sparse``,
``dense-sparse``, ``dictionary``) share: the whitening config and the budget search.

Budget: the allocator's rank ``r`` for an ``m x n`` matrix is a budget of ``r (m + n)``
stored parameters (index storage included, see ``rankcut.layers.base``); each
method picks the largest structure that fits it. A structure never goes below its
smallest size (e.g. one Kronecker term), which may exceed a tiny budget: the layer's
``num_params()`` and the compression report always give the real count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, RankcutError
from .base import MethodConfig


@dataclass
class WhitenedConfig(MethodConfig):
    """Base config of methods fitted to ``||(W - W') S||_F`` (``S S^T = X^T X``).

    Attributes:
        eps: relative diagonal shift used when ``X^T X`` is not positive definite.
    """

    eps: float = 1e-6
    positive_fields = ("eps",)


@dataclass
class AlternatingConfig(WhitenedConfig):
    """Whitened methods fitted by alternating minimization (sparse x dense factors).

    Attributes:
        iters: alternations (dense factor by least squares, then the sparse factor).
        inner: hard-thresholding steps per sparse-factor update.
    """

    iters: int = 2
    inner: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("iters", "inner"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} must be an int >= 0, got {value!r}")


def whitening(stats, config: WhitenedConfig, name: str, device) -> Tensor:
    """Cholesky factor ``S`` of the layer's input Gram, float64 (shared per input)."""
    inputs = getattr(stats, "inputs", None)
    if inputs is None or not inputs.has_gram:
        raise RankcutError(f"{config.method} needs the input Gram of {name}")
    return inputs.cholesky(config.eps, name).to(device=device, dtype=torch.float64)


def weight_budget(m: int, n: int, rank: int) -> int:
    """Parameters an ``m x n`` matrix may store at budget rank ``rank``: ``rank (m + n)``."""
    return rank * (m + n)


def largest_fitting(make: Callable[[int], nn.Module], lo: int, hi: int, budget: int) -> int:
    """Largest ``size`` in ``[lo, hi]`` with ``make(size).num_params() <= budget``.

    ``make`` builds the layer on the meta device (no memory), so the count is the
    layer's own, exact one; cost must grow with ``size``. Returns ``lo`` if none fits.
    """
    if make(lo).num_params() > budget:
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make(mid).num_params() <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
