"""Truncation-aware data whitening (SVD-LLM).

For a linear layer ``y = x W^T`` with calibration inputs ``X`` (rows are tokens) the
output error of a replacement ``W'`` is ``||(W - W') X^T||_F^2 = ||(W - W') S||_F^2``
where ``S`` is the Cholesky factor of the Gram matrix ``X^T X = S S^T``. Truncating the
SVD of ``W S`` therefore minimizes the output error, and each dropped singular value
``s_i`` adds exactly ``s_i^2`` to it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .svd import all_finite, split_factors, truncated_svd
from .threads import small_on_one_thread, threads_for

logger = logging.getLogger(__name__)


@small_on_one_thread
def psd_cholesky(gram: Tensor, eps: float = 1e-6, name: str = "") -> Tensor:
    """Lower Cholesky factor of a symmetric PSD matrix, computed in float64.

    If the matrix is not numerically positive definite (dead input channels, fewer
    tokens than channels), ``eps * mean(diag)`` times the smallest power of ten that
    makes it factor is added to the diagonal and the repair is logged. Only the lower
    triangle is read and no copy of the matrix is made (the shift is undone in place).

    Example:
        >>> import torch
        >>> g = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
        >>> s = psd_cholesky(g)
        >>> torch.allclose(s @ s.T, g.double())
        True
    """
    # Only the lower triangle is read by the factorization, so no symmetrized copy is
    # made: for a 10k-wide input that copy alone is 0.8 GB.
    g = gram.to(torch.float64)
    if not all_finite(g):
        raise ValueError(f"Gram matrix {name!r} contains NaN or inf")
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return chol
    del chol
    # No eigendecomposition to size the shift (it would copy the matrix): start at
    # ``eps * mean(diag)`` and grow tenfold until the factorization succeeds.
    scale = float(g.diagonal().abs().mean()) or 1.0
    shift = eps * scale
    # Shift the diagonal in place and restore it exactly afterwards (no second matrix).
    diagonal = g.diagonal()
    saved = diagonal.clone()
    try:
        while True:
            diagonal.copy_(saved).add_(shift)
            chol, info = torch.linalg.cholesky_ex(g)
            if int(info) == 0:
                logger.warning(
                    "Gram matrix %s is not positive definite; added %.3e (%.0e x its mean "
                    "diagonal) to its diagonal",
                    name or "",
                    shift,
                    shift / scale,
                )
                return chol
            del chol
            shift *= 10  # still indefinite: grow the shift until it factors
    finally:
        diagonal.copy_(saved)


def whitened_spectrum(weight: Tensor, chol: Tensor) -> Tensor:
    """Singular values of ``W S``: ``s_i^2`` is the output error added by dropping ``i``."""
    a = weight.to(torch.float64) @ chol
    with threads_for(min(a.shape), a.device):  # an SVD of the smaller side's cost
        return torch.linalg.svdvals(a)


@small_on_one_thread
def whitened_factors(weight: Tensor, chol: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` minimizer of ``||(W - W') S||_F``: ``W' = [W S]_r S^-1``.

    Args:
        weight: ``(out, in)`` matrix.
        chol: ``(in, in)`` lower-triangular Cholesky factor of ``X^T X``.
        rank: target rank.

    Returns:
        ``(up, down)`` with ``up @ down = W'``; ``down`` absorbs ``S^-1`` through a
        triangular solve (never an explicit inverse).

    Example:
        >>> import torch
        >>> x = torch.randn(50, 4, dtype=torch.float64)
        >>> w = torch.randn(3, 4, dtype=torch.float64)
        >>> up, down = whitened_factors(w, psd_cholesky(x.T @ x), 3)
        >>> torch.allclose(up @ down, w)
        True
    """
    chol = chol.to(torch.float64)
    u, s, vh = truncated_svd(weight.to(torch.float64) @ chol, rank)
    up, down_white = split_factors(u, s, vh)
    del u, vh
    # down = down_white @ S^-1  <=>  S^T down^T = down_white^T, with S^T upper triangular.
    down = torch.linalg.solve_triangular(chol.T, down_white.T, upper=True).T
    return up, down
