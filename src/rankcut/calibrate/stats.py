"""Sufficient statistics of a linear layer's inputs, accumulated as data streams through.

Statistics are accumulated in float64 so that sums over many tokens stay exact enough
for a Cholesky factorization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class InputStats:
    """Gram matrix ``X^T X`` and/or mean absolute activation per input channel."""

    in_features: int
    gram: Tensor | None = None
    abs_sum: Tensor | None = None
    tokens: int = 0
    want_gram: bool = True
    want_abs: bool = False
    #: Derived quantities (e.g. a Cholesky factor) that modules sharing this input reuse.
    cache: dict = field(default_factory=dict, repr=False)

    def update(self, x: Tensor) -> None:
        # One batch's products in float32 (fast; a few thousand terms per entry), the
        # running sums across batches in float64 (exact enough for Cholesky).
        x = x.detach().reshape(-1, self.in_features).float()
        if self.want_gram:
            g = (x.T @ x).to(torch.float64)
            self.gram = g if self.gram is None else self.gram.add_(g)
        if self.want_abs:
            a = x.abs().sum(0, dtype=torch.float64)
            self.abs_sum = a if self.abs_sum is None else self.abs_sum.add_(a)
        self.tokens += x.shape[0]

    def cholesky(self, eps: float = 1e-6, name: str = "") -> Tensor:
        """Cholesky factor of the Gram matrix, computed once per ``eps`` and shared by
        every module reading this input (allocation spectra and SVD-LLM factors alike)."""
        from ..decompose import psd_cholesky

        key = ("chol", eps)
        if key not in self.cache:
            self.cache[key] = psd_cholesky(self.gram, eps=eps, name=name)
        return self.cache[key]

    @property
    def abs_mean(self) -> Tensor | None:
        return None if self.abs_sum is None else self.abs_sum / max(self.tokens, 1)

    def check_finite(self, name: str) -> None:
        from ..errors import RankcutError

        for label, t in (("Gram matrix", self.gram), ("activation mean", self.abs_sum)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise RankcutError(f"non-finite {label} for {name}: the calibration overflowed")


@dataclass
class LayerStats:
    """Everything a method may use about one target layer."""

    inputs: InputStats | None = None
    fisher_in: Tensor | None = None  # (in,) summed squared weight gradients per input channel
    fisher_out: Tensor | None = None  # (out,) summed squared gradients of the layer's output
