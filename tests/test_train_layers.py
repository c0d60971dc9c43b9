"""The training-time layers: LRT's from-scratch ``LowRankLinear``, ``SLTrainLinear`` and
``MaestroLinear``: forward against the dense equivalent, what gradients reach, truncation,
shrinking with an optimizer, and the save/load round trip inside a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankcut
from rankcut.layers import (
    LowRankLinear,
    MaestroLinear,
    SLTrainLinear,
    factorized_modules,
    lowrank_from_scratch,
)
from rankcut.layers.linear import linear_from
from rankcut.layers.trainable import random_support, scratch_factors
from rankcut.models.structure import find_targets, replace_module
from rankcut.train.regularizers import GroupLasso, ProgressiveShrinking

from .conftest import tiny_llama
from .macs_count import count_macs


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sltrain_layer(out_features=12, in_features=20, rank=3, nnz=30, seed=0) -> SLTrainLinear:
    layer = SLTrainLinear.from_scratch(
        in_features, out_features, rank, nnz, alpha=6, generator=_gen(seed), dtype=torch.float64
    )
    with torch.no_grad():  # B starts at zero: make every part of the product show
        layer.up.normal_(generator=_gen(seed + 1))
        layer.bias.normal_(generator=_gen(seed + 2))
    return layer


# -- LRT ----------------------------------------------------------------------------------
def test_lrt_layer_is_a_lowrank_linear_with_the_dense_init_variance():
    layer = lowrank_from_scratch(384, 256, rank=32, bias=True, std=0.02, generator=_gen())
    assert type(layer) is LowRankLinear
    assert {n for n, _ in layer.named_parameters()} == {"down.weight", "up.weight", "up.bias"}
    assert torch.count_nonzero(layer.bias) == 0
    std = float(layer.weight_product().detach().std())
    assert std == pytest.approx(0.02, rel=0.05)
    # Default: the variance of nn.Linear's own init, 1 / (3 in).
    default = lowrank_from_scratch(384, 256, rank=32, generator=_gen(1))
    assert float(default.weight_product().detach().std()) == pytest.approx(
        1 / math.sqrt(3 * 384), rel=0.05
    )
    x = torch.randn(5, 384)
    torch.testing.assert_close(layer(x), x @ layer.weight_product().T + layer.bias)


def test_scratch_factors_are_deterministic_and_balanced():
    a = scratch_factors(16, 8, 4, std=0.1, generator=_gen(3))
    b = scratch_factors(16, 8, 4, std=0.1, generator=_gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    up, down = a
    assert up.shape == (8, 4) and down.shape == (4, 16)
    with pytest.raises(ValueError):
        lowrank_from_scratch(4, 4, rank=5)


# -- SLTrain ------------------------------------------------------------------------------
def test_random_support_is_uniform_distinct_sorted_and_seeded():
    rows, cols = random_support(12, 20, 30, _gen(0))
    flat = rows * 20 + cols
    assert flat.numel() == 30 and flat.unique().numel() == 30
    assert torch.equal(flat, flat.sort().values)
    again = random_support(12, 20, 30, _gen(0))
    other = random_support(12, 20, 30, _gen(1))
    assert torch.equal(again[0] * 20 + again[1], flat)
    assert not torch.equal(other[0] * 20 + other[1], flat)


def test_sltrain_init_follows_the_authors():
    layer = SLTrainLinear.from_scratch(64, 32, rank=4, nnz=100, alpha=32, generator=_gen())
    assert layer.scale == 8.0
    assert torch.count_nonzero(layer.up) == 0  # B zeros
    bound = 1 / math.sqrt(64)
    assert float(layer.down.detach().abs().max()) <= bound  # A Kaiming-uniform, +-1/sqrt(in)
    values = layer.values.detach().abs()
    assert float(values.max()) <= bound and float(values.min()) > 0
    assert torch.count_nonzero(layer.weight_product() - layer.sparse_dense()) == 0
    rows, cols = layer.support()
    assert torch.equal(
        torch.nonzero(layer.sparse_dense()), torch.stack([rows, cols], 1)
    )  # the support, row-major


@pytest.mark.parametrize(
    "tokens, path", [(1, "gather"), (10, "gather"), (11, "scatter"), (24, "scatter"), (50, "dense")]
)
def test_sltrain_forward_equals_its_dense_equivalent_on_every_path(tokens, path):
    layer = sltrain_layer(out_features=40, in_features=60, nnz=240)
    assert layer.path_for(tokens) == path
    x = torch.randn(tokens, layer.in_features, dtype=torch.float64)
    expected = x @ layer.weight_product().T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x[None]), expected[None])
    counted = count_macs(layer, x[None])
    assert layer.macs(tokens) == counted.macs, counted.products
    low_rank = tokens * 3 * (40 + 60)
    expected_macs = {
        "gather": low_rank + tokens * 240,
        "scatter": low_rank + tokens * 2400,
        "dense": 3 * 2400 + tokens * 2400,
    }
    assert layer.macs(tokens) == expected_macs[path]
    if path == "dense":  # fewer multiply-adds than the factors would take
        assert layer.macs(tokens) < low_rank + tokens * 2400


def test_sltrain_weight_product_is_scaled_low_rank_plus_sparse():
    layer = sltrain_layer()
    dense = torch.zeros(12, 20, dtype=torch.float64)
    rows, cols = layer.support()
    dense[rows, cols] = layer.values.detach()
    expected = (6 / 3) * layer.up.detach() @ layer.down.detach() + dense
    torch.testing.assert_close(layer.weight_product().detach(), expected)


@pytest.mark.parametrize("tokens", [1, 16, 50])  # gather, scatter, dense
def test_sltrain_gradients_reach_values_and_factors_never_the_support(tokens):
    layer = sltrain_layer(out_features=40, in_features=60, nnz=240)
    support = (layer.crow.clone(), layer.col.clone())
    x = torch.randn(tokens, 60, dtype=torch.float64)
    target = torch.randn(tokens, 40, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    for buf in (layer.crow, layer.col):
        assert not buf.is_floating_point() and not buf.requires_grad and buf.grad is None
    assert {n for n, _ in layer.named_parameters()} == {"up", "down", "values", "bias"}
    # The values' gradient is the dense weight gradient at the support, and nothing else.
    w = layer.weight_product().detach().requires_grad_(True)
    ((x @ w.T + layer.bias.detach() - target) ** 2).sum().backward()
    rows, cols = layer.support()
    torch.testing.assert_close(layer.values.grad, w.grad[rows, cols])
    torch.optim.AdamW(layer.parameters(), lr=0.1).step()
    assert torch.equal(layer.crow, support[0]) and torch.equal(layer.col, support[1])


def test_sltrain_counts_values_and_index_storage():
    layer = SLTrainLinear(300, 40, rank=5, nnz=600, bias=False)
    assert layer.crow.dtype == torch.int16 and layer.col.dtype == torch.int16
    index = math.ceil((41 * 2 + 600 * 2) / 4)
    assert layer.index_params() == index == SLTrainLinear.index_cost(300, 40, 600)
    assert layer.num_params() == 5 * 340 + 600 + index
    assert layer.structure() == {
        "type": "SLTrainLinear",
        "in_features": 300,
        "out_features": 40,
        "rank": 5,
        "bias": False,
        "nnz": 600,
        "alpha": 32,
    }
    with pytest.raises(ValueError):
        SLTrainLinear(4, 4, rank=1, nnz=17)


# -- Maestro ------------------------------------------------------------------------------
def maestro_and_dense(out_features=10, in_features=14, seed=0):
    gen = _gen(seed)
    weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_features, generator=gen, dtype=torch.float64)
    dense = linear_from(weight, bias)
    return MaestroLinear.from_linear(dense), dense


def test_maestro_from_svd_is_exact_at_full_rank_and_ordered():
    layer, dense = maestro_and_dense()
    assert layer.rank == 10
    x = torch.randn(4, 14, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x))
    torch.testing.assert_close(layer.weight_product(), dense.weight)
    # sqrt(s) split: ||u_i|| = ||v_i|| = sqrt(s_i), non-increasing
    s = torch.linalg.svdvals(dense.weight)
    torch.testing.assert_close(layer.up.norm(dim=0) ** 2, s)
    torch.testing.assert_close(layer.down.norm(dim=1) ** 2, s)


def test_maestro_truncation_full_rank_exact_and_prefix_at_rank_k():
    layer, dense = maestro_and_dense()
    x = torch.randn(3, 14, dtype=torch.float64)
    full = layer.truncate(layer.rank)
    assert type(full) is LowRankLinear
    torch.testing.assert_close(full(x), dense(x))
    u, s, vh = torch.linalg.svd(dense.weight, full_matrices=False)
    for k in (1, 4, 9):
        cut = layer.truncate(k)
        assert cut.rank == k and cut.num_params() == k * 24 + 10
        torch.testing.assert_close(cut.up.weight, layer.up[:, :k].detach())
        torch.testing.assert_close(cut.down.weight, layer.down[:k].detach())
        # SVD-ordered: the first k components are the best rank-k approximation
        torch.testing.assert_close(cut.weight_product(), (u[:, :k] * s[:k]) @ vh[:k])
        layer.active_rank = k
        torch.testing.assert_close(layer(x), cut(x))
        assert layer.macs(3) == 3 * k * 24 == count_macs(layer, x[None]).macs
        layer.active_rank = None
    with pytest.raises(ValueError):
        layer.truncate(11)


def test_maestro_gradients_reach_the_active_prefix_only():
    layer, _ = maestro_and_dense()
    layer.active_rank = 4
    layer(torch.randn(3, 14, dtype=torch.float64)).sum().backward()
    assert torch.count_nonzero(layer.up.grad[:, :4]) > 0
    assert torch.count_nonzero(layer.down.grad[:4]) > 0
    assert torch.count_nonzero(layer.up.grad[:, 4:]) == 0
    assert torch.count_nonzero(layer.down.grad[4:]) == 0
    assert layer.bias.grad is not None


def test_group_lasso_and_importance_match_their_formulas():
    layer, _ = maestro_and_dense()
    u, v = layer.up.detach(), layer.down.detach()
    r = layer.rank
    tails_u = [math.sqrt(float((u[:, i:] ** 2).sum())) for i in range(r)]
    tails_v = [math.sqrt(float((v[i:] ** 2).sum())) for i in range(r)]
    assert float(layer.group_lasso().detach()) == pytest.approx(sum(tails_u) + sum(tails_v))
    importance = layer.importance()
    assert importance.tolist() == pytest.approx(
        [a * b for a, b in zip(tails_u, tails_v, strict=True)]
    )
    assert bool((importance[1:] <= importance[:-1]).all())
    model = nn.Sequential(layer)
    penalty = GroupLasso(coef=0.5).penalty(model)
    assert float(penalty.detach()) == pytest.approx(0.5 * (sum(tails_u) + sum(tails_v)))
    penalty.backward()
    assert layer.up.grad is not None and torch.isfinite(layer.up.grad).all()
    # a zero tail gives a finite (zero) gradient, not NaN
    with torch.no_grad():
        layer.up[:, 7:] = 0
        layer.down[7:] = 0
    layer.up.grad = None
    layer.group_lasso().backward()
    assert torch.isfinite(layer.up.grad).all()


def test_shrinking_keeps_parameters_and_slices_adam_state():
    layer, _ = maestro_and_dense()
    params = (layer.up, layer.down)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(6, 14, dtype=torch.float64)
    for _ in range(2):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    with torch.no_grad():
        layer.up[:, 6:] *= 1e-9
        layer.down[6:] *= 1e-9
    hook = ProgressiveShrinking(threshold=1e-6, every=1, optimizer=opt)
    hook.on_step(nn.Sequential(layer), 0)
    assert layer.rank == 6 and hook.history == [(0, "0", 10, 6)]
    assert layer.up is params[0] and layer.down is params[1]  # the same Parameters
    assert layer.up.shape == (10, 6) and layer.down.shape == (6, 14)
    for p, sl in ((layer.up, (slice(None), slice(0, 6))), (layer.down, (slice(0, 6),))):
        state = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], before[id(p)][key][sl])
        assert torch.equal(state["step"], before[id(p)]["step"])
    layer(x).pow(2).sum().backward()
    opt.step()  # the optimizer still works on the shrunk layer
    assert layer.macs(1) == 6 * 24 and layer.structure()["rank"] == 6


def test_shrinking_while_the_last_steps_graph_is_alive():
    """A loop keeps the previous step's ``loss`` (and its graph) until the next forward:
    the shrunk parameters must not reuse a gradient accumulator of the old shape."""
    layer, _ = maestro_and_dense()
    x = torch.randn(3, 14, dtype=torch.float64)
    loss = layer(x).pow(2).sum()
    loss.backward()
    layer.shrink_(4)
    loss = layer(x).pow(2).sum()  # the old graph is freed only now
    loss.backward()
    assert layer.up.grad.shape == (10, 4) and layer.down.grad.shape == (4, 14)


def test_loading_a_shrunk_state_resizes_a_full_rank_layer():
    layer, _ = maestro_and_dense()
    layer.shrink_(3)
    fresh, _ = maestro_and_dense(seed=1)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.rank == 3
    x = torch.randn(2, 14, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x))


# -- save / load round trips ---------------------------------------------------------------
def _swap_in(model, make):
    for i, (name, module) in enumerate(find_targets(model).items()):
        replace_module(model, name, make(module, i))
    return model


def _sltrain(module, i):
    out_features, in_features = module.weight.shape
    layer = SLTrainLinear.from_scratch(
        in_features, out_features, 4, nnz=in_features * out_features // 20, generator=_gen(i)
    )
    with torch.no_grad():
        layer.up.normal_(std=0.1, generator=_gen(100 + i))
    return layer


def _maestro(module, i):
    layer = MaestroLinear.from_linear(module)
    layer.shrink_(layer.rank - i % 3)  # unequal ranks survive the round trip
    return layer


def _lrt(module, i):
    out_features, in_features = module.weight.shape
    return lowrank_from_scratch(in_features, out_features, 5, bias=False, generator=_gen(i))


@pytest.mark.parametrize("make", [_lrt, _sltrain, _maestro], ids=["lrt", "sltrain", "maestro"])
def test_save_load_round_trips_logits(tmp_path, windows, make):
    model = _swap_in(tiny_llama(), make)
    with torch.no_grad():
        logits = model(windows).logits
    rankcut.save(model, tmp_path / "out")
    loaded = rankcut.load(tmp_path / "out")
    assert [type(m).__name__ for _, m in factorized_modules(loaded)] == [
        type(m).__name__ for _, m in factorized_modules(model)
    ]
    assert {n: m.structure() for n, m in factorized_modules(loaded)} == {
        n: m.structure() for n, m in factorized_modules(model)
    }
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows).logits, logits)
    assert not list((tmp_path / "out").glob("*.bin")) and not list((tmp_path / "out").glob("*.pt"))
