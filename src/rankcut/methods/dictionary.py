"""Sparse dictionary (CoSpaDi): every output channel combines ``s`` of ``k`` learned atoms."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import register_structure
from .common import AlternatingConfig, whitening
from .dense_sparse import fit_row_sparse


@dataclass
class DictionaryConfig(AlternatingConfig):
    """``W' = C D``: dictionary ``D`` ``(k, in)`` of ``k`` atoms, ``C`` ``(out, k)`` with
    ``s = round(density k)`` nonzeros per row anywhere in the row.

    In the ``(in, out)`` orientation of CoSpaDi this is ``W = D C`` with each column of
    ``C`` using ``s`` atoms, so output channels live in different subspaces. ``k`` is
    the largest that fits the budget (at most ``min(out, in)``). Learned on the
    whitened objective by alternation: dictionary by least squares (MOD), codes by hard
    thresholding + least squares on the support (the first coding, on the orthonormal
    SVD dictionary, is exactly what OMP would pick).

    Attributes:
        density: ``s / k``.
        iters, inner: see ``AlternatingConfig``.
    """

    density: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")


@register_structure(
    "dictionary",
    DictionaryConfig,
    needs=("gram",),
    summary="dictionary x column-sparse codes (s atoms per output), whitened (CoSpaDi)",
)
def dictionary(weight, stats, rank, config, name, bias=None):
    chol = whitening(stats, config, name, weight.device)
    sizes = list(range(1, min(weight.shape) + 1))

    def count_of(k):
        return min(k, max(1, round(config.density * k)))

    return fit_row_sparse(weight, chol, rank, sizes, count_of, 0, config, bias)
