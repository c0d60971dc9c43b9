"""Low rank plus sparse (SLTrain's ``W = U V + S`` in post-training form), whitened."""

from __future__ import annotations

from dataclasses import dataclass

from ..decompose.sparse import sparse_plus_lowrank
from ..errors import ConfigError
from ..layers import SparseLowRankLinear
from .base import register_structure
from .common import WhitenedConfig, largest_fitting, weight_budget, whitening


@dataclass
class SvdSparseConfig(WhitenedConfig):
    """``W' = U V + S``: a whitened low-rank product plus the best ``nnz`` single entries.

    Attributes:
        sparse_share: fraction of the budget ``rank (out + in)`` given to the sparse part
            (values and CSR indices); the low-rank part gets the rest (at least rank 1).
        iters: alternations between the low-rank and the sparse part.
    """

    sparse_share: float = 0.25
    iters: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.sparse_share < 1.0:
            raise ConfigError(f"sparse_share must be in [0, 1), got {self.sparse_share}")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError(f"iters must be an int >= 0, got {self.iters!r}")


def split_budget(m: int, n: int, rank: int, share: float) -> tuple[int, int]:
    """``(low_rank, nnz)`` for the budget ``rank (m + n)`` and a sparse share."""
    budget = weight_budget(m, n, rank)
    low = max(1, min(min(m, n), int((1.0 - share) * budget) // (m + n)))

    def make(nnz):
        return SparseLowRankLinear(n, m, rank, low, nnz, bias=False, device="meta")

    nnz = largest_fitting(make, 0, m * n, budget)
    return low, nnz


@register_structure(
    "svd-sparse",
    SvdSparseConfig,
    needs=("gram",),
    summary="whitened low rank + sparse residual, CSR, budget split by sparse_share (SLTrain)",
)
def svd_sparse(weight, stats, rank, config, name, bias=None):
    m, n = weight.shape
    chol = whitening(stats, config, name, weight.device)
    low, nnz = split_budget(m, n, rank, config.sparse_share)
    parts = sparse_plus_lowrank(weight, chol, low, nnz, iters=config.iters)
    return SparseLowRankLinear.from_parts(*parts, rank=rank, bias=bias)
