"""CUR: ``W ~ C U R`` with actual columns ``C = W[:, J]`` and rows ``R = W[I, :]``.

Rows and columns are picked by leverage scores (the CUR behind ANNCUR): rows by the
leverage over the leading left singular vectors of the whitened matrix ``W S`` (the
objective is ``||(W - W') S||_F``, so rows live in whitened space), columns by the
leverage over the leading right singular vectors of ``W diag(d)`` with ``d_j = ||S_j||``
the input channel's activation norm (columns are input channels; their selection must
stay in the original coordinates). ``U`` is the least-squares core for the whitened
objective: ``U = C^+ (W S) (R S)^+``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .threads import small_on_one_thread


def leverage_scores(vectors: Tensor) -> Tensor:
    """Row leverage scores of a matrix with orthonormal columns: squared row norms."""
    return (vectors.to(torch.float64) ** 2).sum(1)


def select_by_leverage(
    scores: Tensor, k: int, sample: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """``k`` sorted indices: the top scores (ties by index) or sampled without replacement.

    Both are prefixes of one order of all indices (a seeded sampled permutation or the
    score ranking), so a larger ``k`` keeps every index a smaller one picked.
    """
    if not 1 <= k <= scores.numel():
        raise ValueError(f"cannot select {k} of {scores.numel()} indices")
    if sample:
        p = scores.clamp_min(0) + 1e-12 * float(scores.abs().max().clamp_min(1e-300))
        order = torch.multinomial(p.cpu(), scores.numel(), replacement=False, generator=generator)
    else:
        # stable sort: equal scores keep index order, so the result is deterministic
        order = torch.sort(-scores.cpu(), stable=True).indices
    return torch.sort(order[:k]).values.to(scores.device)


def energy_rank(s: Tensor, energy: float) -> int:
    """Fewest leading singular values holding ``energy`` of ``sum(s^2)`` (at least 1)."""
    cum = torch.cumsum(s.to(torch.float64) ** 2, 0)
    target = torch.tensor(energy, dtype=cum.dtype) * cum[-1]
    return max(1, min(int(torch.searchsorted(cum, target)) + 1, s.numel()))


@small_on_one_thread
def cur_decomposition(
    weight: Tensor,
    chol: Tensor,
    columns: int,
    rows: int,
    sample: bool = False,
    seed: int = 0,
    energy: float = 0.9,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CUR of ``weight`` for the whitened objective ``||(W - C U R) S||_F``.

    Args:
        weight: ``(out, in)`` matrix.
        chol: ``(in, in)`` Cholesky factor ``S`` of the input Gram (identity: plain CUR).
        columns: number of columns ``c`` of ``C``.
        rows: number of rows ``k`` of ``R``.
        sample: sample by leverage (seeded) instead of taking the top scores.
        seed: seed of the sampler.
        energy: leverage scores are taken over the leading singular vectors holding this
            fraction of the energy: a subspace that does not depend on ``columns`` and
            ``rows``, so selections are nested and the error never grows with them.

    Returns:
        ``(col_idx (c,), row_idx (k,), C (out, c), U (c, k), R (k, in))``.

    Example:
        >>> import torch
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> j, i, c, u, r = cur_decomposition(w, torch.eye(4, dtype=torch.float64), 4, 4)
        >>> torch.allclose(c @ u @ r, w)
        True
    """
    w = weight.to(torch.float64)
    s = chol.to(torch.float64)
    m, n = w.shape
    if not (1 <= columns <= n and 1 <= rows <= m):
        raise ValueError(f"need 1 <= columns <= {n} and 1 <= rows <= {m}")
    gen = torch.Generator().manual_seed(seed) if sample else None
    a = w @ s
    u_a, s_a, _ = torch.linalg.svd(a, full_matrices=False)
    k_rows = energy_rank(s_a, energy)
    row_idx = select_by_leverage(leverage_scores(u_a[:, :k_rows]), rows, sample, gen)
    d = s.norm(dim=1)  # ||S_j,:|| = sqrt(G_jj): activation norm of input channel j
    _, s_c, vh = torch.linalg.svd(w * d[None, :], full_matrices=False)
    k_cols = energy_rank(s_c, energy)
    col_idx = select_by_leverage(leverage_scores(vh[:k_cols].T), columns, sample, gen)
    c = w[:, col_idx]
    r = w[row_idx, :]
    core = torch.linalg.pinv(c) @ a @ torch.linalg.pinv(r @ s)
    return col_idx, row_idx, c, core, r
