"""Dense times semi-structured sparse (DSFormer): ``W' = C D``, ``C`` N:M sparse."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..decompose.sparse import sparse_dense_factors
from ..errors import ConfigError
from ..layers import SparseDenseLinear
from .base import register_structure
from .common import AlternatingConfig, largest_fitting, weight_budget, whitening


@dataclass
class DenseSparseConfig(AlternatingConfig):
    """``W' = C D``: small dense ``D`` ``(k, in)``, ``C`` ``(out, k)`` with ``N`` nonzeros in
    every group of ``M`` consecutive entries of each row.

    In the ``(in, out)`` orientation of the DSFormer paper this is ``W = D C`` with ``C``
    column-sparse; the sparse factor sits on the output side, which makes the whitened
    objective exact. ``k`` (a multiple of ``M``, at most ``min(out, in)``) is the largest
    that fits the budget. Fitted by alternating least squares (see
    ``rankcut.decompose.sparse.sparse_dense_factors``).

    Attributes:
        n_of_m: the pattern ``"N:M"`` (``2:4`` by default).
        iters, inner: see ``AlternatingConfig``.
    """

    n_of_m: str = "2:4"

    def __post_init__(self) -> None:
        super().__post_init__()
        match = re.fullmatch(r"(\d+):(\d+)", str(self.n_of_m))
        if not match or not 1 <= int(match[1]) <= int(match[2]) <= 255:
            raise ConfigError(f"n_of_m must be 'N:M' with 1 <= N <= M <= 255, got {self.n_of_m!r}")

    @property
    def pattern(self) -> tuple[int, int]:
        n, m = self.n_of_m.split(":")
        return int(n), int(m)


def fit_row_sparse(weight, chol, rank, k_sizes, count_of, group, config, bias):
    """Largest ``k`` among ``k_sizes`` within budget, then the alternating fit."""
    m, n = weight.shape

    def make(i):
        k = k_sizes[i]
        return SparseDenseLinear(n, m, rank, k, count_of(k), group, bias=False, device="meta")

    k = k_sizes[largest_fitting(make, 0, len(k_sizes) - 1, weight_budget(m, n, rank))]
    idx, values, d = sparse_dense_factors(
        weight, chol, k, count_of(k), group, iters=config.iters, inner=config.inner
    )
    return SparseDenseLinear.from_parts(idx, values, d, rank=rank, group=group, bias=bias)


@register_structure(
    "dense-sparse",
    DenseSparseConfig,
    needs=("gram",),
    summary="dense x N:M-sparse factors, alternating least squares, whitened (DSFormer)",
)
def dense_sparse(weight, stats, rank, config, name, bias=None):
    chol = whitening(stats, config, name, weight.device)
    n_keep, group = config.pattern
    top = max(group, min(weight.shape) // group * group)
    sizes = list(range(group, top + 1, group))
    return fit_row_sparse(
        weight, chol, rank, sizes, lambda k: k // group * n_keep, group, config, bias
    )
