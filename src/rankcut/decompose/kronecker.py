"""Sums of Kronecker products, ``W ~ sum_k A_k (x) B_k`` (KPSVD, Van Loan & Pitsianis).

With ``W`` of shape ``(m1 m2, n1 n2)``, ``A_k`` of shape ``(m1, n1)`` and ``B_k`` of
shape ``(m2, n2)``, the rearrangement ``R(W)`` (one row per ``m2 x n2`` block of ``W``,
the block flattened) turns every Kronecker product into a rank-one matrix:
``R(A (x) B) = vec(A) vec(B)^T``. A truncated SVD of ``R(W)`` is therefore the best
``K``-term Kronecker sum in Frobenius norm.

Calibration: the output error is ``||(W - W') S||_F`` with ``S S^T = X^T X``. Right
multiplication by a general ``S`` destroys the Kronecker structure, but by a Kronecker
``S1 (x) S2`` it does not: ``(A (x) B)(S1 (x) S2) = (A S1) (x) (B S2)``. So the Gram is
replaced by its nearest Kronecker product ``G1 (x) G2`` (itself a rank-one problem on
``R(G)``), the fit is done exactly in those coordinates and mapped back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .threads import threads_for


def rearrange(matrix: Tensor, m1: int, n1: int) -> Tensor:
    """Van Loan's ``R(W)``: ``(m1 m2, n1 n2) -> (m1 n1, m2 n2)``."""
    m, n = matrix.shape
    if m % m1 or n % n1:
        raise ValueError(f"({m1}, {n1}) does not divide the shape {tuple(matrix.shape)}")
    m2, n2 = m // m1, n // n1
    return matrix.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_sum(a: Tensor, b: Tensor) -> Tensor:
    """``sum_k A_k (x) B_k`` for stacks ``a`` ``(K, m1, n1)`` and ``b`` ``(K, m2, n2)``.

    Example:
        >>> import torch
        >>> a, b = torch.randn(1, 2, 3), torch.randn(1, 4, 5)
        >>> torch.allclose(kron_sum(a, b), torch.kron(a[0], b[0]))
        True
    """
    _, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return torch.einsum("kij,kpq->ipjq", a, b).reshape(m1 * m2, n1 * n2)


def divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def kronecker_shapes(m: int, n: int) -> list[tuple[int, int]]:
    """Factor shapes ``(m1, n1)`` (``m1 | m``, ``n1 | n``), cheapest term first.

    A term costs ``m1 n1 + m2 n2`` parameters; among equal costs, blocks whose aspect is
    closest to the matrix's come first, then the larger ``m1``.
    """
    import math

    def key(s):
        m1, n1 = s
        cost = m1 * n1 + (m // m1) * (n // n1)
        aspect = abs(math.log((m1 * n) / (n1 * m))) if m1 and n1 else 0.0
        return (cost, aspect, -m1, -n1)

    return sorted(((a, b) for a in divisors(m) for b in divisors(n)), key=key)


def kronecker_svd(matrix: Tensor, m1: int, n1: int) -> tuple[Tensor, Tensor, Tensor]:
    """All Kronecker terms of ``matrix`` for the factor shape ``(m1, n1)``, best first.

    Returns:
        ``(A (K, m1, n1), B (K, m2, n2), s (K,))``, balanced (``A_k``, ``B_k`` both carry
        ``sqrt(s_k)``), ``K = min(m1 n1, m2 n2)``; the first ``k`` terms are the best
        ``k``-term approximation in Frobenius norm.
    """
    m, n = matrix.shape
    m2, n2 = m // m1, n // n1
    r = rearrange(matrix.to(torch.float64), m1, n1)
    with threads_for(max(r.shape), r.device):
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
    root = s.sqrt()
    a = (u * root).T.reshape(-1, m1, n1)
    b = (vh * root[:, None]).reshape(-1, m2, n2)
    return a, b, s


def nearest_kronecker_psd(gram: Tensor, n1: int, iters: int = 100) -> tuple[Tensor, Tensor]:
    """``G1 (n1, n1)``, ``G2 (n2, n2)`` symmetric with ``G1 (x) G2`` nearest to ``gram``.

    The leading singular pair of ``R(G)`` by power iteration from ``vec(I)``
    (deterministic); for a positive definite ``G`` both factors are positive
    (semi)definite (Van Loan & Pitsianis), signs are fixed so that both traces are > 0.
    """
    g = gram.to(torch.float64)
    n = g.shape[0]
    n2 = n // n1
    r = rearrange(g, n1, n1)
    v = torch.eye(n2, dtype=g.dtype, device=g.device).reshape(-1)
    v = v / v.norm()
    for _ in range(iters):
        u = r @ v
        u = u / u.norm().clamp_min(1e-300)
        v_new = r.T @ u
        sigma = v_new.norm()
        v_new = v_new / sigma.clamp_min(1e-300)
        done = bool((v_new - v).norm() < 1e-12)
        v = v_new
        if done:
            break
    g1 = (u * sigma.sqrt()).reshape(n1, n1)
    g2 = (v * sigma.sqrt()).reshape(n2, n2)
    if float(g2.trace()) < 0:
        g1, g2 = -g1, -g2
    return (g1 + g1.T) / 2, (g2 + g2.T) / 2


def kron_right_multiply(matrix: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """``W (S1 (x) S2)`` without forming the Kronecker product (rows reshaped to ``n1 x n2``)."""
    m, n = matrix.shape
    n1, n2 = s1.shape[0], s2.shape[0]
    x = matrix.reshape(m, n1, n2)
    return (s1.T @ x @ s2).reshape(m, n)


def whitened_error(weight: Tensor, approx: Tensor, chol: Tensor) -> float:
    """``||(W - W') S||_F^2``: the calibration output error of ``W'``."""
    return float((((weight - approx) @ chol) ** 2).sum())
