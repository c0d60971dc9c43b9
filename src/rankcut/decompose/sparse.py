"""Sparse parts of a factorization, fitted to the whitened objective ``||(W - W') S||_F``.

Two structures:

- ``sparse_plus_lowrank``: ``W' = U V + S_p`` (SLTrain's form, post-training): a
  whitened rank-``r`` product plus ``nnz`` free entries. Support: the entries whose
  optimal single change lowers the output error most (``(R G)_ij^2 / G_jj`` for the
  residual ``R``); values: per-row least squares on that support, exact given the
  support and the low-rank part; then the two parts alternate.
- ``sparse_dense_factors``: ``W' = C D`` with a dense ``D`` ``(k, in)`` and a row-sparse
  ``C`` ``(out, k)`` holding the same number of nonzeros in every row, either anywhere
  in the row (a dictionary: each output channel combines ``s`` of ``k`` atoms, CoSpaDi)
  or ``N`` in every group of ``M`` consecutive entries (``N:M`` semi-structured,
  DSFormer). The sparse factor is on the output side, so whitening is exact:
  ``(W - C D) S = W S - C (D S)``; the problem is a plain sparse coding of ``W S``.
  Alternating minimization: ``D`` by least squares (MOD dictionary update), ``C`` by
  normalized iterative hard thresholding with exact line search followed by least
  squares on the chosen support; every step must lower the error, so the fit only
  descends from its SVD start.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .svd import truncated_svd
from .threads import small_on_one_thread, threads_for


def _lowrank_whitened(target: Tensor, chol: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    from .svd import split_factors

    u, s, vh = truncated_svd(target @ chol, rank)
    up, down_white = split_factors(u, s, vh)
    down = torch.linalg.solve_triangular(chol.T, down_white.T, upper=True).T
    return up, down


def sparse_residual(residual: Tensor, gram: Tensor, nnz: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best ``nnz``-sparse correction of ``residual`` for ``||(R - S_p) S||_F``.

    Returns ``(rows, cols, values)`` sorted row-major (CSR order).
    """
    m, n = residual.shape
    rg = residual @ gram
    diag = gram.diagonal().clamp_min(1e-300)
    score = rg**2 / diag[None, :]
    nnz = min(nnz, m * n)
    flat = (
        torch.topk(score.reshape(-1), nnz, sorted=False).indices
        if nnz
        else score.new_zeros(0, dtype=torch.long)
    )
    flat = torch.sort(flat).values
    rows, cols = flat // n, flat % n
    values = torch.zeros(nnz, dtype=residual.dtype, device=residual.device)
    counts = torch.bincount(rows, minlength=m).tolist()
    start = 0
    # One small solve per row: on one thread unless the rows' systems are large.
    with threads_for(max(counts, default=0), gram.device):
        for i, c in enumerate(counts):
            if c:
                idx = cols[start : start + c]
                sub = gram[idx][:, idx]
                rhs = rg[i, idx]
                try:
                    values[start : start + c] = torch.linalg.solve(sub, rhs)
                except RuntimeError:  # singular sub-Gram (dead channels): least norm
                    values[start : start + c] = torch.linalg.lstsq(sub, rhs[:, None]).solution[:, 0]
                start += c
    return rows, cols, values


@small_on_one_thread
def sparse_plus_lowrank(
    weight: Tensor, chol: Tensor, rank: int, nnz: int, iters: int = 2
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``W ~ up @ down + S_p`` minimizing ``||(W - W') S||_F`` (alternating).

    Args:
        weight: ``(out, in)`` matrix.
        chol: lower Cholesky factor ``S`` of the input Gram.
        rank: rank of the low-rank part (>= 1).
        nnz: nonzeros of the sparse part (>= 0).
        iters: alternations after the first fit; the best iterate is returned.

    Returns:
        ``(up (out, r), down (r, in), rows, cols, values)``.

    Example:
        >>> import torch
        >>> w = torch.randn(5, 4, dtype=torch.float64)
        >>> up, down, i, j, v = sparse_plus_lowrank(w, torch.eye(4, dtype=torch.float64), 1, 20)
        >>> dense = torch.zeros(5, 4, dtype=torch.float64); dense[i, j] = v
        >>> torch.allclose(up @ down + dense, w)
        True
    """
    w = weight.to(torch.float64)
    s = chol.to(torch.float64)
    gram = s @ s.T
    sparse = torch.zeros_like(w)
    best, best_err = None, float("inf")
    for _ in range(iters + 1):
        up, down = _lowrank_whitened(w - sparse, s, rank)
        rows, cols, values = sparse_residual(w - up @ down, gram, nnz)
        sparse = torch.zeros_like(w)
        sparse[rows, cols] = values
        err = float((((w - up @ down - sparse) @ s) ** 2).sum())
        if err < best_err:
            best, best_err = (up, down, rows, cols, values), err
    return best


def project_rows(coef: Tensor, count: int, group: int = 0) -> Tensor:
    """Indices ``(out, count)`` of the kept entries of each row (sorted).

    ``group == 0``: the ``count`` largest ``|coef|`` of each row. ``group == M``: in every
    block of ``M`` consecutive entries the ``count * M / k`` largest (``N:M``).
    """
    m, k = coef.shape
    mag = coef.abs()
    if group:
        n_per = count * group // k
        blocks = mag.reshape(m, k // group, group)
        pos = torch.topk(blocks, n_per, dim=-1, sorted=False).indices
        base = torch.arange(0, k, group, device=coef.device)[None, :, None]
        idx = (pos + base).reshape(m, count)
    else:
        idx = torch.topk(mag, count, dim=1, sorted=False).indices
    return torch.sort(idx, dim=1).values


def _dense_rows(idx: Tensor, values: Tensor, k: int) -> Tensor:
    out = torch.zeros(idx.shape[0], k, dtype=values.dtype, device=values.device)
    return out.scatter_(1, idx, values)


def _debias(a_dt: Tensor, ddt: Tensor, idx: Tensor, chunk: int = 64) -> Tensor:
    """Least-squares values of each row on its support: ``(D D^T)[I, I] c = (A D^T)[I]``."""
    m, t = idx.shape
    values = torch.empty(m, t, dtype=a_dt.dtype, device=a_dt.device)
    ridge = 1e-12 * float(ddt.diagonal().abs().max().clamp_min(1e-300))
    eye = torch.eye(t, dtype=a_dt.dtype, device=a_dt.device)
    for lo in range(0, m, chunk):
        sel = idx[lo : lo + chunk]
        sub = ddt[sel[:, :, None], sel[:, None, :]] + ridge * eye
        rhs = torch.gather(a_dt[lo : lo + chunk], 1, sel)
        # ``sub`` is a ridged Gram: Cholesky, with least squares for the rare block that
        # is not numerically positive definite. (A batched LU solve here failed inside
        # MKL, "Pivots given to lu_solve must all be >= 1", on finite input.)
        factor, info = torch.linalg.cholesky_ex(sub)
        sol = torch.cholesky_solve(rhs[..., None], factor)[..., 0]
        bad = info != 0
        if bad.any():
            sol[bad] = torch.linalg.lstsq(sub[bad], rhs[bad][..., None]).solution[..., 0]
        values[lo : lo + chunk] = sol
    return values


def _residual(a: Tensor, c: Tensor, d: Tensor) -> float:
    return float(((a - c @ d) ** 2).sum())


def _coding_error(aa: float, c: Tensor, a_dt: Tensor, c_ddt: Tensor) -> float:
    """``||A - C D||^2`` from ``A D^T`` and ``C D D^T`` (no ``(out, in)`` product)."""
    return aa - 2.0 * float((c * a_dt).sum()) + float((c * c_ddt).sum())


def _dictionary_update(c: Tensor, a: Tensor) -> Tensor:
    """MOD: ``argmin_D ||A - C D||`` by ridged normal equations (``C`` may have unused or
    dependent columns; least squares for a block that is not numerically definite)."""
    ctc = c.T @ c
    ridge = 1e-12 * float(ctc.diagonal().max().clamp_min(1e-300))
    eye = torch.eye(ctc.shape[0], dtype=ctc.dtype, device=ctc.device)
    factor, info = torch.linalg.cholesky_ex(ctc + ridge * eye)
    if int(info) == 0:
        return torch.cholesky_solve(c.T @ a, factor)
    return torch.linalg.lstsq(c, a).solution


def _unit_atoms(d_new: Tensor, d_old: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale atoms to unit norm and the codes to match (``C D`` unchanged).

    An atom no row uses (its least-squares row is zero) keeps its previous direction, so
    a later coding step can still pick it. Unit atoms make coefficient magnitudes
    comparable, which hard thresholding relies on, and keep the supports' Gram blocks
    well scaled.
    """
    norms = d_new.norm(dim=1)
    live = norms > 0
    scale = torch.where(live, norms, torch.ones_like(norms))
    d = torch.where(live[:, None], d_new / scale[:, None], d_old)
    return d, c * torch.where(live, scale, torch.zeros_like(scale))[None, :]


@small_on_one_thread
def sparse_dense_factors(
    weight: Tensor,
    chol: Tensor,
    k: int,
    count: int,
    group: int = 0,
    iters: int = 4,
    inner: int = 3,
) -> tuple[Tensor, Tensor, Tensor]:
    """``W ~ C D``: ``C`` ``(out, k)`` with ``count`` nonzeros per row, ``D`` ``(k, in)`` dense.

    Minimizes ``||(W - C D) S||_F`` by alternating minimization on ``A = W S``:
    start from the top-``k`` right singular vectors of ``A`` (an orthonormal dictionary,
    for which keeping the largest coefficients is the exact sparse coding), then
    repeat: ``D`` by least squares (MOD) with unit-norm atoms, ``C`` by ``inner`` steps
    of normalized iterative hard thresholding plus least squares on the support.

    Every step is a descent step: a candidate that does not lower the error is refused
    (a refused dictionary update ends the alternation). The objective therefore never
    rises from the SVD-initialized fit, and rounding differences (thread counts, BLAS
    kernels) cannot be amplified into a different answer, as an unguarded hard
    thresholding on a nearly dependent dictionary can.

    Args:
        weight: ``(out, in)`` matrix.
        chol: lower Cholesky factor ``S`` of the input Gram.
        k: inner dimension (dictionary size).
        count: nonzeros per row of ``C`` (``<= k``).
        group: ``0`` for unstructured rows, ``M`` for ``N:M`` groups (``M | k``,
            ``count`` a multiple of ``k / M``).
        iters: alternations.
        inner: hard-thresholding steps per ``C`` update.

    Returns:
        ``(idx (out, count) int64, values (out, count), D (k, in))``.
    """
    w = weight.to(torch.float64)
    s = chol.to(torch.float64)
    m, n = w.shape
    if not 1 <= count <= k:
        raise ValueError(f"need 1 <= count <= k, got count={count}, k={k}")
    if group and (k % group or (count * group) % k):
        raise ValueError(
            f"N:M needs M | k and count = N k / M; got k={k}, M={group}, count={count}"
        )
    a = w @ s
    aa = float((a * a).sum())
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    d = torch.zeros(k, n, dtype=w.dtype, device=w.device)
    d[: min(k, vh.shape[0])] = vh[:k]
    a_dt = a @ d.T
    idx = project_rows(a_dt, count, group)
    c = _dense_rows(idx, torch.gather(a_dt, 1, idx), k)
    err = _residual(a, c, d)
    for _ in range(iters):
        # D step (MOD), kept only if it lowers the error.
        d_new = _dictionary_update(c, a)
        if not torch.isfinite(d_new).all():
            # A least squares that breaks down must not reach ``_debias`` (whose solves
            # may raise on non-finite input) nor the layer: keep the last finite iterate.
            break
        d_new, c_new = _unit_atoms(d_new, d, c)
        err_new = _residual(a, c_new, d_new)
        if not err_new < err:
            break
        d, c, err = d_new, c_new, err_new
        ddt = d @ d.T
        a_dt = a @ d.T
        c_ddt = c @ ddt
        # C step: normalized IHT (exact line search on the current support), each step
        # kept only if it lowers the error; then least squares on the support.
        for _ in range(inner):
            grad = a_dt - c_ddt  # descent direction, (out, k)
            g_sup = torch.zeros_like(grad).scatter_(1, idx, torch.gather(grad, 1, idx))
            denom = float((g_sup * (g_sup @ ddt)).sum())
            if not denom > 0:
                break
            z = c + (float((g_sup**2).sum()) / denom) * grad
            idx_new = project_rows(z, count, group)
            c_new = _dense_rows(idx_new, torch.gather(z, 1, idx_new), k)
            c_ddt_new = c_new @ ddt
            err_new = _coding_error(aa, c_new, a_dt, c_ddt_new)
            if not err_new < err:
                break
            idx, c, c_ddt, err = idx_new, c_new, c_ddt_new, err_new
        c_new = _dense_rows(idx, _debias(a_dt, ddt, idx), k)
        err_new = _residual(a, c_new, d)
        if err_new < err:
            c, err = c_new, err_new
    values = torch.gather(c, 1, idx)
    d = torch.linalg.solve_triangular(s.T, d.T, upper=True).T  # D = D_w S^-1
    return idx, values, d
