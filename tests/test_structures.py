"""Structured factorizations (cur, kronecker, svd-sparse, dense-sparse, dictionary).

For each: exact at full capacity, error non-increasing with capacity, exact parameter
counts (index storage included), forward == the reconstructed matrix product, save/load
round trip, and hypothesis tests on random shapes (non-divisible, rank 1).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rankcut
from rankcut.calibrate import InputStats, LayerStats
from rankcut.decompose.cur import cur_decomposition
from rankcut.decompose.kronecker import (
    kron_right_multiply,
    kron_sum,
    kronecker_svd,
    nearest_kronecker_psd,
    rearrange,
)
from rankcut.decompose.sparse import project_rows, sparse_dense_factors, sparse_plus_lowrank
from rankcut.evaluate import param_summary
from rankcut.layers import (
    CURLinear,
    KroneckerLinear,
    SparseDenseLinear,
    SparseLowRankLinear,
    StructuredLinear,
    factorized_modules,
)
from rankcut.methods import METHODS, SvdLlmConfig
from rankcut.methods.kronecker import best_prefix, prefix_grid

from .conftest import tiny_llama

STRUCTURES = sorted(m for m in METHODS if METHODS[m].build is not None)
FULL_CAPACITY = {
    "cur": {},
    "kronecker": {},
    "svd-sparse": {"sparse_share": 0.0},
    "dense-sparse": {"n_of_m": "4:4"},
    "dictionary": {"density": 1.0},
}


def problem(m, n, seed=0, tokens=None):
    """A weight and calibration statistics with unequal, correlated input channels."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    x = torch.randn(tokens or 4 * n + 8, n, generator=gen, dtype=torch.float64)
    x = (
        x
        @ (torch.eye(n, dtype=torch.float64) + mix)
        * torch.linspace(0.3, 3.0, n, dtype=torch.float64)
    )
    stats = InputStats(n)
    stats.update(x)
    return w, LayerStats(inputs=stats)


def output_error(w, approx, stats):
    delta = w - approx.detach()
    return float(torch.trace(delta @ stats.inputs.gram @ delta.T))


def build(method, w, stats, rank, bias=None, **options):
    spec = METHODS[method]
    config = spec.config_cls(allocation="uniform", **options)
    return spec.make_layer(w, stats, rank, config, "layer", bias=bias, dtype=torch.float64)


def stored_params(layer):
    """Count straight from the state dict: float elements + ceil(integer bytes / 4)."""
    values = sum(t.numel() for t in layer.state_dict().values() if t.is_floating_point())
    index_bytes = sum(
        t.numel() * t.element_size()
        for t in layer.state_dict().values()
        if not t.is_floating_point()
    )
    return values + math.ceil(index_bytes / 4)


def width(limit):
    return 1 if limit <= 256 else 2 if limit <= 2**15 else 4


def formula_params(layer):
    """Each layer's documented cost, written out by hand."""
    m, n = layer.out_features, layer.in_features
    bias = m if layer.bias is not None else 0
    if isinstance(layer, CURLinear):
        c, k = layer.columns, layer.rows
        return c * m + c * k + k * n + math.ceil((c * width(n) + k * width(m)) / 4) + bias
    if isinstance(layer, KroneckerLinear):
        return layer.terms * (layer.m1 * layer.n1 + layer.m2 * layer.n2) + bias
    if isinstance(layer, SparseLowRankLinear):
        idx = (m + 1) * width(layer.nnz + 1) + layer.nnz * width(n)
        return layer.low_rank * (m + n) + layer.nnz + math.ceil(idx / 4) + bias
    if isinstance(layer, SparseDenseLinear):
        limit = layer.group or layer.k
        return layer.k * n + m * layer.count + math.ceil(m * layer.count * width(limit) / 4) + bias
    raise AssertionError(type(layer))


# -- full capacity -------------------------------------------------------------------
@pytest.mark.parametrize("method", STRUCTURES)
def test_exact_at_full_capacity(method):
    w, stats = problem(24, 20)
    layer = build(method, w, stats, rank=2 * 20, **FULL_CAPACITY[method])
    torch.testing.assert_close(layer.weight_product(), w, atol=1e-8, rtol=1e-8)


def test_decompositions_exact_at_full_capacity():
    w, stats = problem(12, 8, seed=1)
    chol = stats.inputs.cholesky()
    _, _, c, u, r = cur_decomposition(w, chol, 8, 8)
    torch.testing.assert_close(c @ u @ r, w)
    a, b, s = kronecker_svd(w, 3, 2)  # 12 = 3*4, 8 = 2*4: min(6, 16) = 6 terms
    assert a.shape == (6, 3, 2) and b.shape == (6, 4, 4)
    torch.testing.assert_close(kron_sum(a, b), w)
    up, down, rows, cols, vals = sparse_plus_lowrank(w, chol, 8, 0)
    torch.testing.assert_close(up @ down, w)
    idx, vals, d = sparse_dense_factors(w, chol, 8, 8, group=4)
    c = torch.zeros(12, 8, dtype=torch.float64).scatter(1, idx, vals)
    torch.testing.assert_close(c @ d, w)


def test_kronecker_rearrangement_and_gram_factors():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, generator=gen), torch.randn(4, 5, generator=gen)
    r = rearrange(torch.kron(a, b), 3, 2)
    torch.testing.assert_close(r, a.reshape(-1, 1) @ b.reshape(1, -1))
    # an exactly Kronecker Gram is recovered (up to the scale split)
    g1 = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    g2 = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    g1, g2 = g1 @ g1.T + torch.eye(3), g2 @ g2.T + torch.eye(4)
    f1, f2 = nearest_kronecker_psd(torch.kron(g1, g2), 3)
    torch.testing.assert_close(torch.kron(f1, f2), torch.kron(g1, g2))
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kron_right_multiply(w, g1, g2), w @ torch.kron(g1, g2))


def test_project_rows_patterns():
    coef = torch.tensor([[1.0, -5.0, 2.0, 0.5, 3.0, 0.1, -4.0, 0.2]])
    assert project_rows(coef, 2).tolist() == [[1, 6]]
    assert project_rows(coef, 4, group=4).tolist() == [[1, 2, 4, 6]]  # 2:4


# -- capacity --------------------------------------------------------------------------
@pytest.mark.parametrize("method", STRUCTURES)
def test_error_non_increasing_with_capacity(method):
    w, stats = problem(32, 24, seed=2)
    errors = []
    for rank in (1, 2, 4, 6, 8, 12, 16, 20):
        layer = build(method, w, stats, rank)
        errors.append(output_error(w, layer.weight_product(), stats))
    for small, large in zip(errors, errors[1:], strict=False):
        assert large <= small * (1 + 1e-9)
    assert errors[-1] < errors[0]


def test_svd_sparse_share_zero_is_svd_llm_and_sparse_part_helps():
    w, stats = problem(32, 24, seed=3)
    rank = 6
    plain = build("svd-sparse", w, stats, rank, sparse_share=0.0)
    up, down = METHODS["svd-llm"].factorize(w, stats, rank, SvdLlmConfig(), "layer")
    assert plain.nnz == 0 and plain.low_rank == rank
    torch.testing.assert_close(plain.weight_product(), up @ down)
    mixed = build("svd-sparse", w, stats, rank, sparse_share=0.3)
    assert mixed.nnz > 0 and mixed.low_rank < rank
    assert mixed.num_params() <= rank * (32 + 24)


@pytest.mark.parametrize("method", STRUCTURES)
def test_whitened_fit_beats_unwhitened_objective(method):
    """Fitting with the real Gram gives a lower output error than with an identity Gram."""
    w, stats = problem(32, 24, seed=4)
    flat = InputStats(24)
    flat.update(torch.eye(24, dtype=torch.float64))
    white = build(method, w, stats, 6).weight_product()
    plain = build(method, w, LayerStats(inputs=flat), 6).weight_product()
    assert output_error(w, white, stats) < output_error(w, plain, stats)


# -- parameter counts and forward -------------------------------------------------------
@pytest.mark.parametrize("method", STRUCTURES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_param_count_exact_and_within_budget(method, with_bias):
    w, stats = problem(40, 28, seed=5)
    bias = torch.randn(40, dtype=torch.float64) if with_bias else None
    for rank in (4, 9):  # (rank 3 is below the smallest 2:4 layer of this shape)
        layer = build(method, w, stats, rank, bias=bias)
        assert layer.num_params() == stored_params(layer) == formula_params(layer)
        assert layer.num_params() - (40 if with_bias else 0) <= rank * (40 + 28)
        assert layer.dense_params() == 40 * 28 + (40 if with_bias else 0)
        assert layer.structure()["rank"] == rank


@pytest.mark.parametrize("method", STRUCTURES)
def test_forward_equals_reconstructed_product(method, monkeypatch):
    w, stats = problem(24, 16, seed=6)
    bias = torch.randn(24, dtype=torch.float64)
    layer = build(method, w, stats, 5, bias=bias)
    dense = layer.weight_product().detach()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    expected = x @ dense.T + bias
    if isinstance(layer, KroneckerLinear):
        layer.allow_rebuild = False  # its batch rule is tested on its own below
    monkeypatch.setattr(type(layer), "weight_product", lambda self: pytest.fail("rebuilt W"))
    # batched (the sparse-dense layer scatters its factor) and one token (it gathers)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x[:1, :1]), expected[:1, :1])
    torch.testing.assert_close(layer(x[0]), expected[0])
    monkeypatch.undo()
    linear = layer.to_linear()
    torch.testing.assert_close(linear(x), expected)


def test_kronecker_keeps_the_prefix_with_the_lowest_true_error():
    """A Gram with outlier channels is far from Kronecker: the factored-Gram fit is then
    not monotone in its number of terms, and the prefix choice keeps the fit's real
    output error non-increasing with the budget (it rose at rank 4 without it)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 36, generator=gen, dtype=torch.float64)
    x = torch.randn(8 * 36, 36, generator=gen, dtype=torch.float64)
    x[:, torch.randperm(36, generator=gen)[:3]] *= 20
    inputs = InputStats(36)
    inputs.update(x)
    stats = LayerStats(inputs=inputs)
    errors = [
        output_error(w, build("kronecker", w, stats, r).weight_product(), stats)
        for r in range(1, 15)
    ]
    for small, large in zip(errors, errors[1:], strict=False):
        assert large <= small * (1 + 1e-9)
    # the choice is the best prefix of the grid, checked by brute force
    chol = stats.inputs.cholesky()
    a, b, _ = kronecker_svd(w, 4, 6)
    k, err = best_prefix(w, a[:9], b[:9], chol)
    brute = {j: float((((w - kron_sum(a[:j], b[:j])) @ chol) ** 2).sum()) for j in prefix_grid(9)}
    assert k == min(brute, key=brute.get) and err == pytest.approx(brute[k], rel=1e-9)


def test_sparse_dense_fit_survives_a_broken_least_squares(monkeypatch):
    """A non-finite dictionary update stops the alternation; the best finite fit stays."""
    w, stats = problem(24, 16, seed=8)
    chol = stats.inputs.cholesky()
    first = sparse_dense_factors(w, chol, 8, 4, iters=0)

    import rankcut.decompose.sparse as sparse

    debias = sparse._debias

    def finite_debias(a_dt, ddt, idx, *args):
        # on non-finite input LAPACK's LU may raise ("Pivots given to lu_solve ...")
        assert torch.isfinite(a_dt).all() and torch.isfinite(ddt).all()
        return debias(a_dt, ddt, idx, *args)

    def broken(c, a):
        return torch.full((c.shape[1], a.shape[1]), float("nan"), dtype=a.dtype)

    monkeypatch.setattr(sparse, "_debias", finite_debias)
    monkeypatch.setattr(sparse, "_dictionary_update", broken)
    idx, values, d = sparse_dense_factors(w, chol, 8, 4, iters=3)
    assert torch.isfinite(values).all() and torch.isfinite(d).all()
    torch.testing.assert_close(d, first[2])
    torch.testing.assert_close(values, first[1])


@pytest.mark.parametrize(("k", "count", "group"), [(16, 8, 0), (24, 12, 0), (16, 8, 4)])
def test_sparse_dense_alternation_only_descends(k, count, group):
    """Every extra alternation lowers (or keeps) the error: no step is taken uphill."""
    w, stats = problem(32, 24, seed=2)
    chol = stats.inputs.cholesky()
    errors = []
    for iters in range(7):
        idx, values, d = sparse_dense_factors(w, chol, k, count, group, iters=iters)
        c = torch.zeros(32, k, dtype=torch.float64).scatter(1, idx, values)
        errors.append(output_error(w, c @ d, stats))
    for fewer, more in zip(errors, errors[1:], strict=False):
        assert more <= fewer * (1 + 1e-9)
    assert errors[-1] < 0.8 * errors[0]  # and the alternation does improve on the SVD start


def test_sparse_dense_fit_does_not_depend_on_threads():
    """Rounding differences (thread counts, repeated calls) stay rounding differences."""
    w, stats = problem(32, 24, seed=2)
    chol = stats.inputs.cholesky()
    threads = torch.get_num_threads()
    fits = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            idx, values, d = sparse_dense_factors(w, chol, 20, 10, iters=6)
            fits.append(torch.zeros(32, 20, dtype=torch.float64).scatter(1, idx, values) @ d)
    finally:
        torch.set_num_threads(threads)
    for fit in fits[1:]:
        torch.testing.assert_close(fit, fits[0], rtol=1e-7, atol=1e-7)


@given(st.integers(1, 5000))
def test_prefix_grid_is_sorted_and_ends_at_the_count(count):
    grid = prefix_grid(count)
    assert grid[0] == 1 and grid[-1] == count and grid == sorted(set(grid))
    # geometric: each step at most doubles (so the best prefix is found within 2x)
    assert all(b <= 2 * a for a, b in zip(grid, grid[1:], strict=False))


def test_kronecker_rebuilds_only_where_cheaper():
    """Many terms: one token goes through the factors, a large batch through ``W'``."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(12, 4, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(12, 6, 6, generator=gen, dtype=torch.float64)
    layer = KroneckerLinear.from_parts(a, b, rank=3)
    dense = torch.kron(a[0], b[0]) + sum(torch.kron(a[k], b[k]) for k in range(1, 12))
    m, n = layer.out_features, layer.in_features
    assert layer.factored_macs() == 12 * min(4 * 6 * 6 + 4 * 4 * 6, 4 * 4 * 6 + 4 * 6 * 6)
    # the rule: T * factored > (K + T) * m n
    cut = next(t for t in range(1, 1000) if t * layer.factored_macs() > (12 + t) * m * n)
    assert not layer.rebuilds_for(cut - 1) and layer.rebuilds_for(cut)
    calls = []
    real = KroneckerLinear.weight_product
    layer.weight_product = lambda: calls.append(1) or real(layer)
    for tokens in (1, cut - 1, cut, 3 * cut):
        x = torch.randn(tokens, n, generator=gen, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        torch.testing.assert_close(y, x @ dense.T)
        y.square().sum().backward()  # both paths are differentiable
        assert torch.isfinite(layer.a.grad).all() and torch.isfinite(x.grad).all()
    assert len(calls) == 2  # the two batches at or above the cut
    layer.allow_rebuild = False
    assert not layer.rebuilds_for(10 * cut)


@pytest.mark.parametrize("method", STRUCTURES)
def test_gradients_reach_the_values(method):
    """Recovery fine-tuning trains the structured layer's values (indices stay fixed)."""
    w, stats = problem(16, 12, seed=7)
    layer = build(method, w, stats, 4).float()
    layer(torch.randn(5, 12)).square().sum().backward()
    grads = [p.grad for p in layer.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# -- whole model --------------------------------------------------------------------
@pytest.mark.parametrize("method", STRUCTURES)
def test_compress_save_load_round_trip(method, tmp_path, windows):
    model = tiny_llama()
    # Uniform ranks, speed-aware rounding off: every target becomes the structure.
    config = METHODS[method].config_cls(
        ratio=0.4, allocation="uniform", rank_multiple=1, min_speedup=1.0
    )
    result = rankcut.compress(model, config, windows, progress=False)
    layers = dict(factorized_modules(model))
    assert len(layers) == 14 and all(isinstance(m, StructuredLinear) for m in layers.values())
    summary = param_summary(model)
    assert summary["params_total"] == result.params["model_after"]
    assert result.params["targeted_after"] == sum(m.num_params() for m in layers.values())
    assert result.params["targeted_after"] <= 0.6 * result.params["targeted_before"]
    ref = model(input_ids=windows).logits
    rankcut.save(model, tmp_path / "out")
    loaded = rankcut.load(tmp_path / "out")
    torch.testing.assert_close(loaded(input_ids=windows).logits, ref, rtol=0, atol=0)
    again = dict(factorized_modules(loaded))
    assert {n: m.structure() for n, m in again.items()} == {
        n: m.structure() for n, m in layers.items()
    }
    assert param_summary(loaded) == summary


# -- random shapes -------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(STRUCTURES),
    m=st.integers(1, 23),
    n=st.integers(1, 23),
    rank=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(method, m, n, rank, seed):
    rank = min(rank, min(m, n))
    w, stats = problem(m, n, seed=seed)
    layer = build(method, w, stats, rank, bias=torch.ones(m, dtype=torch.float64))
    dense = layer.weight_product().detach()
    assert dense.shape == (m, n) and torch.isfinite(dense).all()
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ dense.T + 1.0)
    assert layer.num_params() == stored_params(layer) == formula_params(layer)
    rebuilt = type(layer).from_structure(layer.structure(), device="cpu", dtype=torch.float64)
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), layer(x))
    # never worse than dropping the layer entirely
    assert output_error(w, dense, stats) <= output_error(w, torch.zeros_like(w), stats) * (1 + 1e-9)


@pytest.mark.parametrize("allocation", ["global", "sensitivity"])
def test_allocators_apply_to_structures(allocation, windows):
    """The rank an allocator gives is a budget: the global ratio holds for structures."""
    options = {"samples": 2, "seq_len": 16} if allocation == "sensitivity" else {}
    config = METHODS["svd-sparse"].config_cls(
        ratio=0.4, allocation=allocation, allocation_options=options
    )
    model = tiny_llama()
    result = rankcut.compress(model, config, windows, progress=False)
    layers = dict(factorized_modules(model))
    assert result.ranks and set(layers) == set(result.ranks)  # the rest stays dense
    assert all(isinstance(m, SparseLowRankLinear) for m in layers.values())
    assert result.params["targeted_after"] <= 0.6 * result.params["targeted_before"]


def test_debias_solves_each_support_and_falls_back_to_least_squares(monkeypatch):
    import rankcut.decompose.sparse as sparse

    gen = torch.Generator().manual_seed(9)
    d = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    a = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    idx = torch.stack([torch.randperm(6, generator=gen)[:3].sort().values for _ in range(5)])
    expected = torch.stack(
        [torch.linalg.lstsq(d[i].T, a[r]).solution for r, i in enumerate(idx)]
    )  # least squares of each row of A on its own atoms
    torch.testing.assert_close(sparse._debias(a @ d.T, d @ d.T, idx), expected)
    chol_ex = torch.linalg.cholesky_ex

    def failing(sub):  # report the second block as not positive definite
        factor, info = chol_ex(sub)
        factor, info = factor.clone(), info.clone()
        factor[1], info[1] = float("nan"), 1
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    torch.testing.assert_close(sparse._debias(a @ d.T, d @ d.T, idx), expected)
