"""Pure helpers for rank allocation under a global parameter budget.

Conventions: a module ``m x n`` at rank ``r`` costs ``r (m + n)``; rank 0 means the
matrix stays dense and costs ``m n``. ``--ratio c`` removes a fraction ``c`` of the
targeted parameters *in total*: the allocation's cost is at most ``(1 - c) sum(m n)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError

Shape = tuple[int, int]


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio must be in (0, 1), got {ratio}")


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """``floor((1 - ratio) * m * n / (m + n))``: the rank that removes ``ratio`` of ``m n``.

    Returns 0 when factorizing would not save parameters (the matrix stays dense).

    Example:
        >>> rank_for_ratio(576, 1536, 0.2)
        335
    """
    check_ratio(ratio)
    m, n = out_features, in_features
    rank = min(math.floor((1.0 - ratio) * m * n / (m + n)), min(m, n))
    return rank if saves_params(m, n, rank) else 0


def saves_params(out_features: int, in_features: int, rank: int) -> bool:
    """True when a rank-``rank`` factorization stores fewer parameters than the dense matrix."""
    return 0 < rank and rank * (out_features + in_features) < out_features * in_features


def max_saving_rank(m: int, n: int) -> int:
    """Largest rank that still stores fewer parameters than dense (0 if none)."""
    r = min((m * n - 1) // (m + n), min(m, n))
    return r if saves_params(m, n, r) else 0


def cost(shape: Shape, rank: int) -> int:
    """Parameters stored for ``shape`` at ``rank`` (0 = dense)."""
    m, n = shape
    return m * n if rank == 0 else rank * (m + n)


def total_cost(shapes: dict[str, Shape], ranks: dict[str, int]) -> int:
    return sum(cost(shapes[k], ranks[k]) for k in shapes)


def budget(shapes: dict[str, Shape], ratio: float) -> int:
    """Parameters the targeted matrices may keep: ``floor((1 - ratio) sum(m n))``."""
    check_ratio(ratio)
    return math.floor((1.0 - ratio) * sum(m * n for m, n in shapes.values()))


def floors(shapes: dict[str, Shape], ratio: float, fraction: float) -> dict[str, int]:
    """Minimum rank per module: ``fraction`` of its uniform rank, at least 1."""
    return {
        k: max(1, math.ceil(fraction * rank_for_ratio(m, n, ratio))) if max_saving_rank(m, n) else 0
        for k, (m, n) in shapes.items()
    }


def greedy_fill(
    shapes: dict[str, Shape],
    scores: dict[str, Tensor],
    start: dict[str, int],
    limit: int,
) -> dict[str, int]:
    """Add singular directions by score per parameter until the budget ``limit`` is spent.

    ``scores[k][i]`` is the value of keeping component ``i`` of module ``k``; it is made
    non-increasing in ``i`` (a running minimum) so that the kept set of every module is
    a prefix, i.e. a rank. Ranks never exceed the largest rank that saves parameters.
    The result costs at most ``limit`` and adding one more direction anywhere would
    exceed it.
    """
    ranks = dict(start)
    spent = total_cost(shapes, ranks)
    items = []
    for k, s in scores.items():
        m, n = shapes[k]
        cap = max_saving_rank(m, n)
        if cap == 0 or ranks[k] == 0:
            continue
        mono = torch.cummin(s.to(torch.float64).flatten()[:cap], dim=0).values
        for i in range(ranks[k], cap):
            items.append((float(mono[i]) / (m + n), k, i))
    items.sort(key=lambda t: (-t[0], t[2]))
    for _, k, i in items:
        m, n = shapes[k]
        if ranks[k] == i and spent + (m + n) <= limit:
            ranks[k] = i + 1
            spent += m + n
    return ranks


def densify_if_affordable(
    shapes: dict[str, Shape], ranks: dict[str, int], limit: int
) -> dict[str, int]:
    """Modules at their largest saving rank become dense when the budget still allows."""
    ranks = dict(ranks)
    spent = total_cost(shapes, ranks)
    for k, (m, n) in sorted(shapes.items()):
        r = ranks[k]
        if r and r == max_saving_rank(m, n) and spent - cost((m, n), r) + m * n <= limit:
            spent += m * n - cost((m, n), r)
            ranks[k] = 0
    return ranks


def bisect_to_budget(
    fn, shapes: dict[str, Shape], limit: int, lo: float, hi: float, steps: int = 60
) -> dict[str, int]:
    """Largest knob in ``[lo, hi]`` whose ranks ``fn(knob)`` fit ``limit`` (``fn`` monotone)."""
    best = fn(lo)
    if total_cost(shapes, best) > limit:
        return best  # even the smallest setting overshoots: caller reports it
    for _ in range(steps):
        mid = (lo + hi) / 2
        ranks = fn(mid)
        if total_cost(shapes, ranks) <= limit:
            lo, best = mid, ranks
        else:
            hi = mid
    return best
