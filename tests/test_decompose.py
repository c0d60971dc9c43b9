"""Mathematics of the factorizations (pure tensors)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.decompose import (
    column_scaled_factors,
    psd_cholesky,
    svd_factors,
    whitened_factors,
    whitened_spectrum,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 1000))
def test_full_rank_reproduces_weight(m, n, seed):
    w = rand(m, n, seed=seed)
    up, down = svd_factors(w, min(m, n))
    assert up.shape == (m, min(m, n)) and down.shape == (min(m, n), n)
    torch.testing.assert_close(up @ down, w)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 10), n=st.integers(2, 10), seed=st.integers(0, 1000))
def test_error_non_increasing_in_rank_all_methods(m, n, seed):
    w = rand(m, n, seed=seed)
    x = rand(40, n, seed=seed + 1)
    chol = psd_cholesky(x.T @ x)
    scale = rand(n, seed=seed + 2).abs() + 0.1
    errors = {"svd": [], "white": [], "scaled": []}
    for r in range(1, min(m, n) + 1):
        errors["svd"].append(torch.linalg.norm(w - torch.matmul(*svd_factors(w, r))))
        errors["white"].append(
            torch.linalg.norm((w - torch.matmul(*whitened_factors(w, chol, r))) @ x.T)
        )
        errors["scaled"].append(
            torch.linalg.norm((w - torch.matmul(*column_scaled_factors(w, scale, r))) * scale)
        )
    for errs in errors.values():
        for a, b in zip(errs, errs[1:], strict=False):
            assert b <= a + 1e-9
        assert errs[-1] < 1e-8 * (1 + float(errs[0]))


def test_truncation_error_equals_dropped_singular_values():
    w = rand(9, 7)
    s = torch.linalg.svdvals(w)
    up, down = svd_factors(w, 3)
    err2 = torch.linalg.norm(w - up @ down) ** 2
    torch.testing.assert_close(err2, (s[3:] ** 2).sum())


def test_whitened_truncation_beats_plain_svd_on_output_error():
    # Anisotropic inputs: a few channels carry most of the energy.
    x = rand(200, 16, seed=3) * torch.logspace(0, 2, 16, dtype=torch.float64)
    w = rand(12, 16, seed=4)
    chol = psd_cholesky(x.T @ x)
    for r in (2, 4, 8):
        plain = torch.linalg.norm((w - torch.matmul(*svd_factors(w, r))) @ x.T)
        white = torch.linalg.norm((w - torch.matmul(*whitened_factors(w, chol, r))) @ x.T)
        assert white < plain
        # Each dropped whitened singular value s_i adds exactly s_i^2 to the output error.
        s = whitened_spectrum(w, chol)
        torch.testing.assert_close(white**2, (s[r:] ** 2).sum())


def correlated_inputs(tokens, n, seed):
    """Tokens x n inputs with correlated, unequally scaled channels (full column rank)."""
    mix = rand(n, n, seed=seed + 1) + 2 * torch.eye(n, dtype=torch.float64)
    return rand(tokens, n, seed=seed) @ mix * torch.logspace(0, 1.5, n, dtype=torch.float64)


@pytest.mark.parametrize(
    ("m", "n", "tokens", "r"), [(6, 8, 100, 3), (12, 16, 200, 5), (16, 10, 60, 4)]
)
def test_whitened_truncation_is_the_closed_form_optimum(m, n, tokens, r):
    """Eckart-Young on the outputs: the rank-r minimizer of ||(W - W') X^T||_F is the
    projection of W onto the top-r left singular vectors of Y = W X^T, ``W' = U_r U_r^T W``
    (then ``W' X^T = U_r U_r^T Y`` is the best rank-r approximation of ``Y``, and it is the
    only minimizer: X has full column rank and s_r > s_r+1). An independent route from
    ``[W S]_r S^-1``: no Cholesky factor, no whitening."""
    x = correlated_inputs(tokens, n, seed=5 + m)
    w = rand(m, n, seed=6 + m)
    up, down = whitened_factors(w, psd_cholesky(x.T @ x), r)
    assert up.shape == (m, r) and down.shape == (r, n)
    u, s, _ = torch.linalg.svd(w @ x.T, full_matrices=False)
    assert s[r - 1] > 1.01 * s[r]  # the optimum is unique
    optimum = u[:, :r] @ u[:, :r].T @ w
    scale = float(torch.linalg.norm(w))
    torch.testing.assert_close(up @ down, optimum, atol=1e-9 * scale, rtol=0)
    # Its error is exactly the dropped singular values of the outputs.
    error = torch.linalg.norm((w - up @ down) @ x.T)
    torch.testing.assert_close(error, s[r:].pow(2).sum().sqrt(), atol=0, rtol=1e-9)
    # ...which the plain (unweighted) SVD does not reach on these inputs.
    plain = torch.linalg.norm((w - torch.matmul(*svd_factors(w, r))) @ x.T)
    assert plain > 1.01 * error


def test_whitened_factors_are_a_local_minimum_of_the_output_error():
    """At the minimizer the gradient of f(A, B) = ||(W - A B) X^T||_F^2 vanishes, and no
    small step of the factors along random directions lowers f."""
    x = correlated_inputs(120, 10, seed=7)
    w = rand(8, 10, seed=8)
    up, down = whitened_factors(w, psd_cholesky(x.T @ x), 4)

    def f(a, b):
        return torch.linalg.norm((w - a @ b) @ x.T) ** 2

    a, b = up.clone().requires_grad_(), down.clone().requires_grad_()
    value = f(a, b)
    ga, gb = torch.autograd.grad(value, (a, b))
    # Relative to the gradient's size at a generic point (the zero-error scale).
    generic = torch.autograd.grad(f(a * 1.1, b), a)[0]
    assert float(torch.linalg.norm(ga)) < 1e-9 * float(torch.linalg.norm(generic))
    assert float(torch.linalg.norm(gb)) < 1e-9 * float(torch.linalg.norm(generic))
    value = float(value.detach())
    for seed in range(10):
        da, db = rand(*up.shape, seed=300 + seed), rand(*down.shape, seed=400 + seed)
        for t in (1e-2, 1e-3):
            assert float(f(up + t * da, down + t * db)) >= value * (1 - 1e-12)


def test_psd_cholesky_repairs_singular_gram(caplog):
    x = rand(3, 6)  # rank 3 < 6: X^T X is singular
    g = x.T @ x
    with caplog.at_level("WARNING"):
        s = psd_cholesky(g, name="demo")
    assert "not positive definite" in caplog.text
    assert torch.isfinite(s).all()
    assert torch.allclose(s @ s.T, g, atol=1e-4 * float(g.diagonal().mean()))


def test_psd_cholesky_rejects_nan():
    g = torch.eye(3, dtype=torch.float64)
    g[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        psd_cholesky(g)


def test_column_scaled_minimizes_weighted_error():
    w = rand(10, 6)
    d = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1, 0.01], dtype=torch.float64)
    for r in (1, 2, 4):
        weighted = torch.linalg.norm((w - torch.matmul(*column_scaled_factors(w, d, r))) * d)
        plain = torch.linalg.norm((w - torch.matmul(*svd_factors(w, r))) * d)
        assert weighted <= plain + 1e-12


@pytest.mark.parametrize("bad", [torch.zeros(4), -torch.ones(4), torch.ones(3)])
def test_column_scaled_rejects_bad_scale(bad):
    with pytest.raises(ValueError):
        column_scaled_factors(rand(5, 4), bad, 2)


@pytest.mark.parametrize("rank", [0, 6])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match="rank"):
        svd_factors(rand(5, 4), rank)


def test_psd_cholesky_leaves_the_gram_untouched_and_reads_the_lower_triangle():
    x = torch.randn(3, 6, dtype=torch.float64)  # rank 3 < 6: needs the diagonal repair
    g = x.T @ x
    before = g.clone()
    s = psd_cholesky(g)
    assert torch.equal(g, before)  # the in-place shift is undone exactly
    assert torch.allclose(s @ s.T, g, atol=1e-3 * float(g.diagonal().mean()))
    full = torch.randn(40, 6, dtype=torch.float64)
    g = full.T @ full
    garbage_upper = torch.tril(g) + torch.triu(torch.full_like(g, 1e9), 1)
    torch.testing.assert_close(psd_cholesky(garbage_upper), psd_cholesky(g))


@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
@pytest.mark.parametrize("deficient", [False, True])
def test_truncated_svd_matches_lapack(shape, deficient):
    """The eigendecomposition route (and its fallback on a spectrum that falls to zero)
    gives LAPACK's leading triplets: same values, same rank-r product, orthonormal."""
    from rankcut.decompose.svd import truncated_svd

    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    if deficient:  # rank 6: the 10th singular value is ~0, the route must fall back
        a = torch.randn(shape[0], 6, generator=g, dtype=torch.float64) @ torch.randn(
            6, shape[1], generator=g, dtype=torch.float64
        )
    rank = 10
    u, s, vh = truncated_svd(a, rank)
    u0, s0, vh0 = torch.linalg.svd(a, full_matrices=False)
    assert u.shape == (shape[0], rank) and vh.shape == (rank, shape[1])
    torch.testing.assert_close(s, s0[:rank])
    torch.testing.assert_close(
        (u * s) @ vh, (u0[:, :rank] * s0[:rank]) @ vh0[:rank], atol=1e-9, rtol=1e-9
    )
    if not deficient:
        torch.testing.assert_close(u.T @ u, torch.eye(rank, dtype=torch.float64))
        torch.testing.assert_close(vh @ vh.T, torch.eye(rank, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite(dtype):
    from rankcut.decompose import all_finite

    t = torch.full((4, 5), 3e4).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[2, 3] = bad
        assert not all_finite(u)
    u = t.clone()
    u[0, 0], u[1, 1] = float("inf"), -float("inf")  # inf - inf: NaN, still caught
    assert not all_finite(u)


@pytest.fixture
def two_threads():
    """Run with two intra-op threads (the tests run with OMP_NUM_THREADS=1), restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_decompositions_run_on_one_thread_and_restore_it(two_threads):
    from rankcut.decompose.threads import SMALL_DECOMPOSITION, small_on_one_thread, threads_for

    seen = []

    @small_on_one_thread
    def probe(x):
        seen.append(torch.get_num_threads())
        return x

    probe(torch.zeros(4, 4))
    probe(torch.zeros(2, SMALL_DECOMPOSITION + 1))  # large: left alone
    assert seen == [1, 2] and torch.get_num_threads() == 2
    with pytest.raises(ValueError), threads_for(8):
        assert torch.get_num_threads() == 1
        raise ValueError("the count is restored on errors too")
    assert torch.get_num_threads() == 2
    with threads_for(8, device="meta"):  # not the CPU's threads
        assert torch.get_num_threads() == 2


def test_single_thread_results_equal_the_multithreaded_ones(two_threads):
    """The same factors whichever thread count computes them (to float64 rounding)."""
    from rankcut.decompose import threads

    x = rand(200, 48, seed=3)
    w = rand(40, 48, seed=4)
    chol = psd_cholesky(x.T @ x)
    one = whitened_factors(w, chol, 12)
    spectrum = whitened_spectrum(w, chol)
    assert torch.get_num_threads() == 2
    limit = threads.SMALL_DECOMPOSITION
    try:
        threads.SMALL_DECOMPOSITION = 0  # now nothing is small: two threads throughout
        chol2 = psd_cholesky(x.T @ x)
        two = whitened_factors(w, chol2, 12)
        spectrum2 = whitened_spectrum(w, chol2)
    finally:
        threads.SMALL_DECOMPOSITION = limit
    torch.testing.assert_close(chol, chol2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one[0] @ one[1], two[0] @ two[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(spectrum, spectrum2, rtol=1e-12, atol=1e-12)
