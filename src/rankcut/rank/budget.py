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
    caps: dict[str, int] | None = None,
) -> dict[str, int]:
    """Add singular directions by score per parameter until the budget ``limit`` is spent.

    ``scores[k][i]`` is the value of keeping component ``i`` of module ``k``; it is made
    non-increasing in ``i`` (a running minimum) so that the kept set of every module is
    a prefix, i.e. a rank. Ranks never exceed ``caps`` (default: the largest rank that
    saves parameters). The result costs at most ``limit`` and adding one more direction anywhere would
    exceed it.
    """
    ranks = dict(start)
    spent = total_cost(shapes, ranks)
    items = []
    for k, s in scores.items():
        m, n = shapes[k]
        cap = caps[k] if caps is not None else max_saving_rank(m, n)
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


def lagrangian_ranks(
    shapes: dict[str, Shape],
    scores: dict[str, Tensor],
    limit: int,
    floor: dict[str, int],
    caps: dict[str, int] | None = None,
) -> dict[str, int]:
    """Ranks or dense per module minimizing the summed score of dropped directions.

    Module ``k`` may take any rank in ``[floor[k], caps[k]]`` (default cap: the largest
    rank that saves parameters) or stay dense. Dropping component ``i`` costs
    ``scores[k][i]`` (made non-increasing), keeping it costs ``m + n`` parameters; dense
    drops nothing and costs ``m n``. For a price ``lam`` per parameter each module takes
    its cheapest option of ``dropped score + lam * cost``; ``lam`` is bisected (log
    scale) to the lowest price that fits ``limit``. Unlike a greedy over directions,
    this weighs "keep the matrix exact" against "a rank just below break-even" that
    costs nearly as much and still loses the tail.

    Returns ranks (0 = dense) costing at most ``limit`` when the floors fit at all.
    """
    caps = caps or {k: max_saving_rank(m, n) for k, (m, n) in shapes.items()}
    tables = {}
    for k in shapes:
        cap = caps[k]
        s = scores[k].to(torch.float64).flatten()
        mono = torch.cummin(s, dim=0).values if s.numel() else s
        # tail[r] = score dropped at rank r (sum of components r..end)
        tail = torch.flip(torch.cumsum(torch.flip(mono, [0]), 0), [0])
        tail = torch.cat([tail, tail.new_zeros(1)])
        tables[k] = (mono, tail, cap, min(floor.get(k, 1), cap) if cap else 0)

    def at(log_inv_lam: float) -> dict[str, int]:
        lam = math.exp(-log_inv_lam)
        out = {}
        for k, (m, n) in shapes.items():
            mono, tail, cap, lo = tables[k]
            if cap == 0:
                out[k] = 0
                continue
            # components worth more than their price, as a prefix of the monotone scores
            r = int((mono[:cap] > lam * (m + n)).sum())
            r = min(max(r, lo), cap)
            low_rank = float(tail[r]) + lam * r * (m + n)
            out[k] = 0 if lam * m * n <= low_rank else r
        return out

    return bisect_to_budget(at, shapes, limit, -80.0, 80.0, steps=80)


def densify_if_affordable(
    shapes: dict[str, Shape],
    ranks: dict[str, int],
    limit: int,
    caps: dict[str, int] | None = None,
) -> dict[str, int]:
    """Modules at their cap (default: largest saving rank) become dense if the budget allows."""
    ranks = dict(ranks)
    spent = total_cost(shapes, ranks)
    for k, (m, n) in sorted(shapes.items()):
        r = ranks[k]
        cap = caps[k] if caps is not None else max_saving_rank(m, n)
        if r and r >= cap and spent - cost((m, n), r) + m * n <= limit:
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


def fast_rank_cap(m: int, n: int, min_speedup: float) -> int:
    """Largest rank whose multiply-adds ``r (m + n)`` are at most ``m n / min_speedup``.

    Example:
        >>> fast_rank_cap(576, 576, 1.25)
        230
    """
    return min(math.floor(m * n / ((m + n) * min_speedup)), max_saving_rank(m, n))


def round_rank(rank: int, multiple: int) -> int:
    """``rank`` rounded down to ``multiple``; ranks below ``4 * multiple`` stay as they are.

    Rounding a rank that small would cut a large share of it (more than a quarter) for
    no measurable speed: kernels only care about alignment once the factors are wide.

    Example:
        >>> round_rank(230, 16), round_rank(20, 16)
        (224, 20)
    """
    if multiple <= 1 or rank < 4 * multiple:
        return rank
    return rank // multiple * multiple


def speed_round(
    shapes: dict[str, Shape],
    ranks: dict[str, int],
    limit: int,
    multiple: int = 1,
    min_speedup: float = 1.0,
    scores: dict[str, Tensor] | None = None,
    floor: dict[str, int] | None = None,
) -> dict[str, int]:
    """Make an allocation pay off in time, still within the parameter budget ``limit``.

    1. A matrix whose rank would not make it at least ``min_speedup`` times cheaper in
       multiply-adds (``m n / (r (m + n))``) stays dense: near the break-even rank the
       two thin products cost more than the one dense product.
    2. Other ranks are rounded down to ``multiple`` (see ``round_rank``).
    3. While over budget, the module whose last ``multiple`` directions are worth least
       per parameter (``scores``, else the one with the largest rank relative to its
       allocated rank) loses them, never going below ``floor`` when that is possible.
    4. What rounding freed is spent again the same way in reverse, ``multiple``
       directions at a time, never past the speed cap of step 1 nor beyond the
       original allocation's cost: the post-step moves parameters, it does not add any.

    Ranks stay multiples of ``multiple`` (when not below ``4 * multiple``).
    """
    floor = floor or {}
    target = dict(ranks)
    caps = {k: fast_rank_cap(m, n, min_speedup) for k, (m, n) in shapes.items()}
    out = {}
    for k, r in ranks.items():
        if r == 0 or r > caps[k]:
            out[k] = 0
        else:
            out[k] = round_rank(r, multiple)

    def up(r: int) -> int:
        return multiple if multiple > 1 and r >= 4 * multiple else 1

    def down(r: int) -> int:
        return multiple if multiple > 1 and r - multiple >= 4 * multiple else 1

    def worth(k: str, lo: int, hi: int) -> float:
        m, n = shapes[k]
        if scores is not None and k in scores:
            s = scores[k].to(torch.float64).flatten()
            return float(s[lo:hi].sum()) / ((hi - lo) * (m + n))
        return -(hi / max(target[k], 1))  # no spectrum: keep ranks proportional to target

    spent = total_cost(shapes, out)
    for respect_floor in (True, False):
        while spent > limit:
            options = []
            for k, r in out.items():
                d = down(r) if r > 1 else 0
                low = max(floor.get(k, 1), 1) if respect_floor else 1
                if d and r - d >= low:
                    options.append((worth(k, r - d, r), k, d))
            if not options:
                break
            _, k, d = min(options)
            out[k] -= d
            spent -= d * sum(shapes[k])
    refill = min(limit, total_cost(shapes, ranks))
    while True:
        options = []
        for k, r in out.items():
            d = up(r)
            if r and r + d <= caps[k] and spent + d * sum(shapes[k]) <= refill:
                options.append((worth(k, r, r + d), k, d))
        if not options:
            break
        _, k, d = max(options)
        out[k] += d
        spent += d * sum(shapes[k])
    return out
