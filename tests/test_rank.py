"""Rank allocators on synthetic spectra: budget, monotonicity, floors, dense matrices."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.errors import ConfigError
from rankcut.rank import (
    ALLOCATORS,
    AllocationInput,
    allocate,
    budget,
    decay_exponent,
    elbow_index,
    max_saving_rank,
    rank_for_ratio,
    total_cost,
)

SHAPES = {
    "a.q": (64, 64),
    "a.up": (128, 64),
    "a.down": (64, 128),
    "b.q": (64, 64),
    "b.up": (128, 64),
    "b.down": (64, 128),
}


def spectra(seed=0, flat=()):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (k, (m, n)) in enumerate(SHAPES.items()):
        r = min(m, n)
        if k in flat:
            out[k] = torch.ones(r, dtype=torch.float64)
        else:
            decay = 0.5 + i * 0.3 + float(torch.rand(1, generator=gen))
            out[k] = torch.arange(1, r + 1, dtype=torch.float64) ** -decay
    return out


def make_input(ratio, seed=0, flat=(), **kw):
    s = spectra(seed, flat)
    scores = {k: v**2 * (1 + j) for j, (k, v) in enumerate(s.items())}
    table = {k: {c: c * (1 + j) for c in (0.2, 0.4, 0.6, 0.8)} for j, k in enumerate(SHAPES)}
    return AllocationInput(
        SHAPES, ratio, spectra=s, component_scores=scores, loss_table=table, **kw
    )


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.6])
def test_budget_met_within_one_rank_step_per_module(name, ratio):
    ranks = allocate(name, make_input(ratio))
    limit = budget(SHAPES, ratio)
    spent = total_cost(SHAPES, ranks)
    assert spent <= limit
    if name != "uniform":  # uniform rounds every module down on its own
        assert limit - spent <= max(m + n for m, n in SHAPES.values())
    else:
        assert limit - spent <= sum(m + n for m, n in SHAPES.values())
    for k, r in ranks.items():
        assert 0 <= r <= max_saving_rank(*SHAPES[k])


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_monotone_in_budget(name):
    previous = None
    for ratio in (0.7, 0.5, 0.3, 0.1):  # budget grows
        spent = total_cost(SHAPES, allocate(name, make_input(ratio)))
        if previous is not None:
            assert spent >= previous
        previous = spent


@pytest.mark.parametrize("name", ["energy", "elbow", "global", "sensitivity"])
def test_floor_respected(name):
    ratio = 0.5
    ranks = allocate(name, make_input(ratio, min_rank_fraction=0.5))
    for k, (m, n) in SHAPES.items():
        if ranks[k]:
            assert ranks[k] >= math.ceil(0.5 * rank_for_ratio(m, n, ratio))


def test_heavy_tail_keeps_flat_spectrum_dense():
    ranks = allocate("heavy-tail", make_input(0.3, flat=("a.q",)))
    assert ranks["a.q"] == 0  # no low-rank structure: kept dense
    assert all(r > 0 for k, r in ranks.items() if k != "a.q")
    assert total_cost(SHAPES, ranks) <= budget(SHAPES, 0.3)


def test_global_follows_scores():
    inp = make_input(0.4)
    # Make one module's directions far more valuable: it must keep more than uniform.
    inp.component_scores["a.up"] = inp.component_scores["a.up"] * 1e6
    ranks = allocate("global", inp)
    assert ranks["a.up"] > rank_for_ratio(128, 64, 0.4) or ranks["a.up"] == 0


def test_energy_prefers_concentrated_spectra():
    ranks = allocate("energy", make_input(0.4))
    # b.down decays fastest (largest exponent), a.q slowest: the slow one keeps more.
    assert ranks["a.q"] >= ranks["b.q"]


def test_sensitivity_protects_sensitive_modules():
    inp = make_input(0.4)
    inp.loss_table["a.q"] = {c: 100.0 * c for c in (0.2, 0.4, 0.6, 0.8)}
    ranks = allocate("sensitivity", inp)
    assert ranks["a.q"] == 0 or ranks["a.q"] >= rank_for_ratio(64, 64, 0.2)


@settings(max_examples=30, deadline=None)
@given(
    ratio=st.floats(0.05, 0.9), seed=st.integers(0, 100), name=st.sampled_from(sorted(ALLOCATORS))
)
def test_any_budget_is_met(ratio, seed, name):
    ranks = allocate(name, make_input(ratio, seed=seed))
    assert total_cost(SHAPES, ranks) <= budget(SHAPES, ratio)


def test_elbow_and_decay_helpers():
    assert elbow_index(torch.tensor([10.0, 9.5, 9.0, 1.0, 0.9, 0.8, 0.7])) == 3
    assert decay_exponent(torch.ones(50)) == pytest.approx(0.0, abs=1e-9)
    assert decay_exponent(torch.arange(1, 101, dtype=torch.float64) ** -1.5) == pytest.approx(1.5)


def test_unknown_allocator_and_missing_inputs():
    with pytest.raises(ConfigError):
        allocate("nope", make_input(0.2))
    from rankcut.errors import RankcutError

    with pytest.raises(RankcutError, match="spectra"):
        allocate("energy", AllocationInput(SHAPES, 0.2))


def _dropped(scores, ranks):
    return sum(float(scores[k][r:].sum()) for k, r in ranks.items() if r)


def test_lagrangian_keeps_flat_matrix_dense_instead_of_near_break_even_rank():
    from rankcut.rank.budget import floors, greedy_fill, lagrangian_ranks

    shapes = {"flat": (64, 64), "steep": (64, 64)}
    scores = {
        "flat": torch.ones(64, dtype=torch.float64),
        "steep": 0.5 ** torch.arange(64, dtype=torch.float64),
    }
    limit = 64 * 64 + 8 * 128  # dense "flat" plus rank 8 for "steep"
    fl = floors(shapes, 0.5, 0.0)
    ranks = lagrangian_ranks(shapes, scores, limit, fl)
    assert ranks == {"flat": 0, "steep": 8}
    greedy = greedy_fill(shapes, scores, fl, limit)  # directions only: no dense option
    assert greedy["flat"] == max_saving_rank(64, 64)
    assert _dropped(scores, ranks) < _dropped(scores, greedy)


@settings(max_examples=40, deadline=None)
@given(ratio=st.floats(0.05, 0.9), seed=st.integers(0, 100), speedup=st.sampled_from([1.0, 1.5]))
def test_lagrangian_meets_budget_floor_and_caps(ratio, seed, speedup):
    from rankcut.rank.budget import fast_rank_cap, floors, lagrangian_ranks

    inp = make_input(ratio, seed=seed)
    limit = budget(SHAPES, ratio)
    fl = floors(SHAPES, ratio, 0.25)
    caps = {k: fast_rank_cap(m, n, speedup) for k, (m, n) in SHAPES.items()}
    ranks = lagrangian_ranks(SHAPES, inp.component_scores, limit, fl, caps)
    assert total_cost(SHAPES, ranks) <= limit
    for k, r in ranks.items():
        assert r == 0 or min(fl[k], caps[k]) <= r <= caps[k]


def test_global_rank_never_past_speed_cap():
    from rankcut.rank.budget import fast_rank_cap

    for ratio in (0.1, 0.3, 0.5):
        ranks = allocate("global", make_input(ratio, min_speedup=1.25))
        for k, (m, n) in SHAPES.items():
            assert ranks[k] == 0 or ranks[k] <= fast_rank_cap(m, n, 1.25)
