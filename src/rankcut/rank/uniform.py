"""Rank allocation: how many singular directions each targeted matrix keeps.

An allocator maps ``{module_name: (out, in)}`` and a compression ratio to
``{module_name: rank}``; a rank of 0 means "keep the matrix dense".
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import ConfigError

Allocator = Callable[..., dict[str, int]]
ALLOCATORS: dict[str, Allocator] = {}


def register_allocator(name: str) -> Callable[[Allocator], Allocator]:
    def wrap(fn: Allocator) -> Allocator:
        ALLOCATORS[name] = fn
        return fn

    return wrap


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """``floor((1 - ratio) * m * n / (m + n))``: the rank that removes ``ratio`` of ``m n``.

    Returns 0 when factorizing would not save parameters (the matrix stays dense).

    Example:
        >>> rank_for_ratio(576, 1536, 0.2)
        335
    """
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio must be in (0, 1), got {ratio}")
    m, n = out_features, in_features
    rank = min(math.floor((1.0 - ratio) * m * n / (m + n)), min(m, n))
    return rank if 0 < rank and rank * (m + n) < m * n else 0


def saves_params(out_features: int, in_features: int, rank: int) -> bool:
    """True when a rank-``rank`` factorization stores fewer parameters than the dense matrix."""
    return 0 < rank and rank * (out_features + in_features) < out_features * in_features


@register_allocator("uniform")
def uniform(shapes: dict[str, tuple[int, int]], ratio: float, **_) -> dict[str, int]:
    """The same ratio for every matrix."""
    return {name: rank_for_ratio(m, n, ratio) for name, (m, n) in shapes.items()}


def allocate(
    name: str, shapes: dict[str, tuple[int, int]], ratio: float, **kwargs
) -> dict[str, int]:
    """Run the allocator registered as ``name``."""
    if name not in ALLOCATORS:
        raise ConfigError(f"unknown allocation {name!r}; known: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name](shapes, ratio, **kwargs)
