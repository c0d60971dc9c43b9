"""Rank allocators: ``AllocationInput -> {module_name: rank}`` (0 = keep dense).

Each allocator meets the global budget (``ratio`` of the targeted parameters removed in
total) and never gives a module less than its floor (a fraction of its uniform rank):
removing a matrix almost entirely costs far more than the spectrum suggests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..decompose.spectrum import DEFAULT_BETA_MIN, is_low_rank
from ..errors import ConfigError, RankcutError
from .budget import (
    Shape,
    bisect_to_budget,
    budget,
    cost,
    densify_if_affordable,
    fast_rank_cap,
    floors,
    greedy_fill,
    lagrangian_ranks,
    max_saving_rank,
    rank_for_ratio,
    speed_round,
    total_cost,
)


@dataclass
class AllocationInput:
    """What allocators may use; which fields must be present is declared per allocator.

    Attributes:
        shapes: ``(out, in)`` per module.
        ratio: fraction of the targeted parameters to remove in total.
        spectra: singular values per module, descending (whitened when a Gram is known).
        component_scores: estimated loss increase of dropping each singular direction
            (the ``global`` allocator's score), descending order of the spectrum.
        loss_table: ``{module: {candidate_ratio: calibration-loss increase}}``.
        min_rank_fraction: floor per module, as a fraction of its uniform rank.
        options: allocator-specific knobs.
        rank_multiple, min_speedup: speed-aware post-step applied to every allocator's
            result (see ``budget.speed_round``); ``1`` and ``1.0`` turn it off.
    """

    shapes: dict[str, Shape]
    ratio: float
    spectra: dict[str, Tensor] | None = None
    component_scores: dict[str, Tensor] | None = None
    loss_table: dict[str, dict[float, float]] | None = None
    min_rank_fraction: float = 0.25
    options: dict = field(default_factory=dict)
    rank_multiple: int = 1
    min_speedup: float = 1.0


#: Option kinds an allocator may declare: a check and what the error says it must be.
OPTION_KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    "ratios": (
        lambda v: (
            isinstance(v, (list, tuple))
            and len(v) > 0
            and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c < 1 for c in v
            )
        ),
        "a non-empty list of ratios in (0, 1)",
    ),
}


@dataclass(frozen=True)
class AllocatorSpec:
    """A registered allocator.

    Attributes:
        name: what ``MethodConfig.allocation`` calls it.
        fn: ``fn(AllocationInput) -> {name: rank}``.
        needs: inputs it reads, a subset of ``{"spectra", "component_scores", "loss_table"}``.
        summary: one line for listings.
        options: the ``allocation_options`` it takes, ``{key: kind}`` (``OPTION_KINDS``).
    """

    name: str
    fn: Callable[[AllocationInput], dict[str, int]]
    needs: frozenset[str]
    summary: str
    options: dict[str, str] = field(default_factory=dict)

    def check_options(self, options: dict) -> None:
        """A one-line ``ConfigError`` for an option this allocator does not take or a
        value of the wrong kind.

        Example:
            >>> ALLOCATORS["heavy-tail"].check_options({"beta_min": 0.2})
            >>> ALLOCATORS["uniform"].check_options({"beta_min": 0.2})
            Traceback (most recent call last):
            ...
            rankcut.errors.ConfigError: allocation 'uniform' takes no option 'beta_min' (valid: none)
        """
        for key, value in options.items():
            if key not in self.options:
                valid = ", ".join(sorted(self.options)) or "none"
                raise ConfigError(
                    f"allocation {self.name!r} takes no option {key!r} (valid: {valid})"
                )
            check, what = OPTION_KINDS[self.options[key]]
            if not check(value):
                raise ConfigError(f"allocation_options[{key!r}] must be {what}, got {value!r}")


ALLOCATORS: dict[str, AllocatorSpec] = {}


def register_allocator(
    name: str,
    needs: tuple[str, ...] = (),
    summary: str = "",
    options: dict[str, str] | None = None,
):
    """Register ``fn(AllocationInput) -> {name: rank}`` as allocation ``name``.

    ``options`` declares the ``allocation_options`` keys it reads and their kinds
    (``"number"``, ``"count"``, ``"ratios"``); configs are validated against them.

    Example:
        >>> @register_allocator("first-half", options={"share": "number"})
        ... def first_half(inp):
        ...     return {k: min(m, n) // 2 for k, (m, n) in inp.shapes.items()}
        >>> ALLOCATORS.pop("first-half").options
        {'share': 'number'}
    """
    for kind in (options or {}).values():
        if kind not in OPTION_KINDS:
            raise ValueError(f"unknown option kind {kind!r}; known: {', '.join(OPTION_KINDS)}")

    def wrap(fn):
        ALLOCATORS[name] = AllocatorSpec(name, fn, frozenset(needs), summary, dict(options or {}))
        return fn

    return wrap


def allocate(name: str, inp: AllocationInput) -> dict[str, int]:
    """Run the allocator registered as ``name`` after checking its inputs."""
    if name not in ALLOCATORS:
        raise ConfigError(f"unknown allocation {name!r}; known: {', '.join(sorted(ALLOCATORS))}")
    spec = ALLOCATORS[name]
    for need in spec.needs:
        if getattr(inp, need) is None:
            raise RankcutError(f"allocation {name!r} needs {need}")
    ranks = spec.fn(inp)
    limit = budget(inp.shapes, inp.ratio)
    if inp.rank_multiple > 1 or inp.min_speedup > 1.0:
        scores = inp.component_scores
        if scores is None and inp.spectra is not None:
            scores = _relative_energy(inp.spectra)
        ranks = speed_round(
            inp.shapes,
            ranks,
            limit,
            inp.rank_multiple,
            inp.min_speedup,
            scores,
            floors(inp.shapes, inp.ratio, inp.min_rank_fraction),
        )
    spent = total_cost(inp.shapes, ranks)
    if spent > limit:
        # Uniform ranks ignore min_rank_fraction: only the rounding can overshoot there.
        hint = (
            "lower rank_multiple or min_speedup"
            if name == "uniform"
            else "lower min_rank_fraction or the number of matrices kept dense"
        )
        raise RankcutError(
            f"allocation {name!r} cannot meet the budget: {spent:,} > {limit:,} parameters ({hint})"
        )
    return ranks


def _relative_energy(spectra: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, s in spectra.items():
        e = s.to(torch.float64) ** 2
        out[k] = e / e.sum().clamp_min(1e-300)
    return out


def _finish(
    inp: AllocationInput,
    ranks: dict[str, int],
    scores: dict[str, Tensor] | None,
    caps: dict[str, int] | None = None,
):
    """Spend what is left of the budget by ``scores``, then densify saturated modules."""
    limit = budget(inp.shapes, inp.ratio)
    if scores is not None:
        ranks = greedy_fill(inp.shapes, scores, ranks, limit, caps)
    return densify_if_affordable(inp.shapes, ranks, limit, caps)


@register_allocator("uniform", summary="the same ratio for every matrix")
def uniform(inp: AllocationInput) -> dict[str, int]:
    return {k: rank_for_ratio(m, n, inp.ratio) for k, (m, n) in inp.shapes.items()}


def _energy_ranks(inp: AllocationInput, keys, tau: float, fl: dict[str, int]) -> dict[str, int]:
    ranks = {}
    for k in keys:
        m, n = inp.shapes[k]
        cap = max_saving_rank(m, n)
        e = torch.cumsum(_relative_energy({k: inp.spectra[k]})[k], 0)
        r = int(torch.searchsorted(e, torch.tensor(tau, dtype=e.dtype) - 1e-12)) + 1
        ranks[k] = max(fl[k], min(cap, r)) if cap else 0
    return ranks


@register_allocator(
    "energy",
    needs=("spectra",),
    summary="each matrix keeps the same fraction of its (whitened) spectral energy",
)
def energy(inp: AllocationInput) -> dict[str, int]:
    fl = floors(inp.shapes, inp.ratio, inp.min_rank_fraction)
    limit = budget(inp.shapes, inp.ratio)
    ranks = bisect_to_budget(
        lambda tau: _energy_ranks(inp, inp.shapes, tau, fl), inp.shapes, limit, 0.0, 1.0
    )
    return _finish(inp, ranks, _relative_energy(inp.spectra))


def elbow_index(s: Tensor) -> int:
    """Elbow of a descending spectrum: the point farthest below the chord from first to last.

    Example:
        >>> import torch
        >>> elbow_index(torch.tensor([10.0, 9.0, 1.0, 0.9, 0.8]))
        2
    """
    s = s.to(torch.float64)
    k = s.numel()
    if k < 3 or float(s[0] - s[-1]) <= 0:
        return k
    x = torch.linspace(0, 1, k, dtype=torch.float64)
    y = (s - s[-1]) / (s[0] - s[-1])
    return int(torch.argmax(1 - x - y)) or 1


@register_allocator(
    "elbow",
    needs=("spectra",),
    summary="ranks proportional to the elbow of each (whitened) spectrum, scaled to the budget",
)
def elbow(inp: AllocationInput) -> dict[str, int]:
    fl = floors(inp.shapes, inp.ratio, inp.min_rank_fraction)
    limit = budget(inp.shapes, inp.ratio)
    elbows = {k: elbow_index(inp.spectra[k]) for k in inp.shapes}

    def at(alpha: float) -> dict[str, int]:
        out = {}
        for k, (m, n) in inp.shapes.items():
            cap = max_saving_rank(m, n)
            out[k] = max(fl[k], min(cap, round(alpha * elbows[k]))) if cap else 0
        return out

    hi = max(max_saving_rank(m, n) / max(elbows[k], 1) for k, (m, n) in inp.shapes.items())
    ranks = bisect_to_budget(at, inp.shapes, limit, 0.0, max(hi, 1.0))
    return _finish(inp, ranks, _relative_energy(inp.spectra))


@register_allocator(
    "heavy-tail",
    needs=("spectra",),
    options={"beta_min": "number"},
    summary="WeLore-style: matrices without a decaying spectrum stay dense, the rest share the cut",
)
def heavy_tail(inp: AllocationInput) -> dict[str, int]:
    beta_min = float(inp.options.get("beta_min", DEFAULT_BETA_MIN))
    limit = budget(inp.shapes, inp.ratio)
    fl = floors(inp.shapes, inp.ratio, inp.min_rank_fraction)
    low_rank = [
        k
        for k in inp.shapes
        if max_saving_rank(*inp.shapes[k]) and is_low_rank(inp.spectra[k], beta_min)
    ]
    dense = {k: 0 for k in inp.shapes if k not in low_rank}
    lrc_floor = {k: 1 for k in low_rank}
    if total_cost(inp.shapes, {**dense, **lrc_floor}) > limit:
        raise RankcutError(
            f"heavy-tail: {len(dense)} matrices without low-rank structure (beta < {beta_min}) "
            "cost more than the budget; lower beta_min or the ratio"
        )

    def at(tau: float) -> dict[str, int]:
        return {**dense, **_energy_ranks(inp, low_rank, tau, fl)}

    ranks = bisect_to_budget(at, inp.shapes, limit, 0.0, 1.0)
    if total_cost(inp.shapes, ranks) > limit:  # floors too high for the dense share: drop them
        ranks = bisect_to_budget(
            lambda tau: {**dense, **_energy_ranks(inp, low_rank, tau, lrc_floor)},
            inp.shapes,
            limit,
            0.0,
            1.0,
        )
    scores = {k: v for k, v in _relative_energy(inp.spectra).items() if k in low_rank}
    return _finish(inp, ranks, scores)


@register_allocator(
    "global",
    needs=("spectra",),
    summary="drop the directions with the least loss increase per parameter across all matrices",
)
def global_(inp: AllocationInput) -> dict[str, int]:
    """Least estimated loss increase for the budget, over all directions of all matrices.

    In whitened coordinates dropping direction ``i`` adds ``s_i^2`` to the layer's output
    error; ``component_scores`` weights it by the loss's sensitivity to that output
    direction (``u_i^T diag(F_out) u_i``, the output Fisher), so layers that matter more
    to the loss keep more. Each matrix takes a rank (never below its floor) or stays
    dense, whichever is cheaper at a common price per parameter (``lagrangian_ranks``):
    a matrix whose useful rank is near break-even stays exact instead. With
    ``min_speedup > 1`` ranks are capped where they would no longer be faster than dense.
    Left-over budget is spent direction by direction.
    """
    scores = inp.component_scores
    if scores is None:
        scores = {k: s.to(torch.float64) ** 2 for k, s in inp.spectra.items()}
    fl = floors(inp.shapes, inp.ratio, inp.min_rank_fraction)
    limit = budget(inp.shapes, inp.ratio)
    caps = {k: fast_rank_cap(m, n, inp.min_speedup) for k, (m, n) in inp.shapes.items()}
    ranks = lagrangian_ranks(inp.shapes, scores, limit, fl, caps)
    if total_cost(inp.shapes, ranks) > limit:  # the floors alone overshoot: plain greedy
        ranks = fl
    return _finish(inp, ranks, scores, caps)


@register_allocator(
    "sensitivity",
    needs=("loss_table",),
    options={"candidates": "ratios", "samples": "count", "seq_len": "count"},
    summary="ASVD-style search over measured calibration-loss increases per matrix and ratio",
)
def sensitivity(inp: AllocationInput) -> dict[str, int]:
    """Pick one candidate ratio per matrix minimizing total loss increase within the budget.

    Lagrangian relaxation: for a price ``lam`` per parameter each matrix takes the
    candidate minimizing ``loss(c) + lam * cost(c)``; ``lam`` is bisected (on a log
    scale) to the cheapest price that fits. Leftover budget goes to (whitened) energy.
    """
    table = inp.loss_table
    limit = budget(inp.shapes, inp.ratio)
    fl = floors(inp.shapes, inp.ratio, inp.min_rank_fraction)

    def ranks_for(c: float, k: str) -> int:
        m, n = inp.shapes[k]
        return 0 if c <= 0 else max(fl[k], rank_for_ratio(m, n, c))

    def at(log_inv_lam: float) -> dict[str, int]:
        lam = math.exp(-log_inv_lam)
        out = {}
        for k in inp.shapes:
            options = [(table[k][c], ranks_for(c, k)) for c in table[k]]
            # The floor is always an option, priced pessimistically (twice the worst measured
            # loss) so that budgets beyond the largest candidate ratio stay reachable.
            options.append((2 * max(table[k].values()) + 1e-12, fl[k]))
            out[k] = min(options, key=lambda o, k=k: o[0] + lam * cost(inp.shapes[k], o[1]))[1]
        return out

    ranks = bisect_to_budget(at, inp.shapes, limit, -60.0, 60.0)
    scores = _relative_energy(inp.spectra) if inp.spectra is not None else None
    return _finish(inp, ranks, scores)
