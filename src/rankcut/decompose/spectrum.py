"""Pure functions of a singular-value spectrum: effective rank, energy, power-law decay."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Top-half power-law exponent below which a spectrum is "not low-rank" (WeLore-style).
DEFAULT_BETA_MIN = 0.1


def effective_rank(s: Tensor) -> float:
    """RankMe effective rank: ``exp(H(p))`` with ``p_i = s_i / sum(s)``.

    ``n`` equal singular values give ``n``; a single non-zero one gives 1; an all-zero
    spectrum gives 0.

    Example:
        >>> import torch
        >>> round(effective_rank(torch.ones(8)), 6), effective_rank(torch.tensor([3.0, 0, 0]))
        (8.0, 1.0)
    """
    s = s.to(torch.float64).flatten().abs()
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * torch.log(p)).sum()))


def energy_kept(s: Tensor, rank: int) -> float:
    """Share of ``sum(s_i^2)`` in the top ``rank`` singular values (1.0 when ``rank`` = 0,
    meaning the matrix stays dense).

    Example:
        >>> import torch
        >>> energy_kept(torch.tensor([2.0, 1.0]), 1)
        0.8
    """
    e = s.to(torch.float64).flatten() ** 2
    total = float(e.sum())
    if rank <= 0 or rank >= e.numel() or total <= 0.0:
        return 1.0
    return float(e[:rank].sum()) / total


def decay_exponent(s: Tensor) -> float:
    """Power-law decay ``s_i ~ i^-beta`` fitted on the top half of a spectrum (log-log LS).

    A flat spectrum gives 0 (no low-rank structure); heavy-tailed, fast-decaying
    spectra give large ``beta``.
    """
    s = s.to(torch.float64)
    s = s[s > s[0] * 1e-12]
    half = max(2, s.numel() // 2)
    y = torch.log(s[:half])
    x = torch.log(torch.arange(1, half + 1, dtype=torch.float64))
    x = x - x.mean()
    return float(-(x * (y - y.mean())).sum() / (x * x).sum().clamp_min(1e-300))


def is_low_rank(s: Tensor, beta_min: float = DEFAULT_BETA_MIN) -> bool:
    """The heavy-tail classification: the spectrum decays at least like ``i^-beta_min``."""
    return decay_exponent(s) >= beta_min
