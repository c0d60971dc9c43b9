"""Sums of Kronecker products (KPSVD via Van Loan's rearrangement), whitened."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..decompose import psd_cholesky
from ..decompose.cur import energy_rank
from ..decompose.kronecker import (
    kron_right_multiply,
    kron_sum,
    kronecker_shapes,
    kronecker_svd,
    nearest_kronecker_psd,
    whitened_error,
)
from ..errors import ConfigError
from ..layers import KroneckerLinear
from .base import register_structure
from .structured import WhitenedConfig, weight_budget, whitening

TERM_RULES = ("budget", "energy", "elbow")
WHITEN = ("auto", "kron", "none")


@dataclass
class KroneckerConfig(WhitenedConfig):
    """``W' = sum_k A_k (x) B_k`` (SoKA's KPSVD).

    Each term costs ``m1 n1 + m2 n2``; the budget ``rank (out + in)`` sets the number of
    terms. Calibration uses the nearest Kronecker factorization ``G1 (x) G2`` of the
    input Gram, in whose coordinates the fit is exact (``rankcut.decompose.kronecker``).

    Attributes:
        shape: ``auto`` (from the divisors of ``out`` and ``in``: the cheapest terms
            first, see ``candidates``) or ``"M1xN1"`` for ``A_k`` of that shape.
        candidates: with ``auto``, how many of the cheapest factor shapes to fit; the
            one with the lowest output error wins.
        terms: ``budget`` (as many terms as the budget pays for), ``energy`` (the fewest
            keeping ``energy`` of the rearranged spectrum's energy, at most the budget)
            or ``elbow`` (the elbow of that spectrum, at most the budget).
        energy: energy fraction for ``terms="energy"``.
        whiten: ``kron`` (Kronecker-factored Gram), ``none`` (plain Frobenius) or
            ``auto`` (both; the lower true output error ``||(W - W') S||`` wins).
    """

    shape: str = "auto"
    candidates: int = 1
    terms: str = "budget"
    energy: float = 0.99
    whiten: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shape != "auto" and not re.fullmatch(r"\d+x\d+", self.shape):
            raise ConfigError(f"shape must be 'auto' or 'M1xN1', got {self.shape!r}")
        if self.terms not in TERM_RULES:
            raise ConfigError(f"terms must be one of {TERM_RULES}, got {self.terms!r}")
        if self.whiten not in WHITEN:
            raise ConfigError(f"whiten must be one of {WHITEN}, got {self.whiten!r}")
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy}")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise ConfigError(f"candidates must be an int >= 1, got {self.candidates!r}")


def number_of_terms(s: torch.Tensor, budget_terms: int, config: KroneckerConfig) -> int:
    """Terms to keep: what the budget pays for, capped by the energy/elbow rule."""
    from ..rank.allocators import elbow_index

    k = min(max(budget_terms, 1), s.numel())
    if config.terms == "energy":
        k = min(k, energy_rank(s, config.energy))
    elif config.terms == "elbow":
        k = min(k, max(elbow_index(s), 1))
    return max(k, 1)


def kronecker_fit(weight, chol, m1, n1, rank, config, gram=None):
    """Best fit for one factor shape: ``(a, b, output error)``."""
    m, n = weight.shape
    cost = m1 * n1 + (m // m1) * (n // n1)
    budget_terms = weight_budget(m, n, rank) // cost
    fits = []
    if config.whiten in ("none", "auto"):
        a, b, s = kronecker_svd(weight, m1, n1)
        k = number_of_terms(s, budget_terms, config)
        fits.append((a[:k], b[:k]))
    if config.whiten in ("kron", "auto"):
        g = chol @ chol.T if gram is None else gram
        g1, g2 = nearest_kronecker_psd(g, n1)
        s1, s2 = psd_cholesky(g1, config.eps), psd_cholesky(g2, config.eps)
        a, b, s = kronecker_svd(kron_right_multiply(weight, s1, s2), m1, n1)
        k = number_of_terms(s, budget_terms, config)
        # (A' (x) B')(S1 (x) S2)^-1 = (A' S1^-1) (x) (B' S2^-1)
        a = torch.linalg.solve_triangular(s1, a[:k], upper=False, left=False)
        b = torch.linalg.solve_triangular(s2, b[:k], upper=False, left=False)
        fits.append((a, b))
    scored = [(whitened_error(weight, kron_sum(a, b), chol), a, b) for a, b in fits]
    err, a, b = min(scored, key=lambda t: t[0])
    return a, b, err


@register_structure(
    "kronecker",
    KroneckerConfig,
    needs=("gram",),
    summary="sum of Kronecker products via Van Loan rearrangement + SVD (KPSVD), whitened",
)
def kronecker(weight, stats, rank, config, name, bias=None):
    m, n = weight.shape
    w = weight.to(torch.float64)
    chol = whitening(stats, config, name, weight.device)
    if config.shape == "auto":
        shapes = kronecker_shapes(m, n)[: config.candidates]
    else:
        m1, n1 = (int(v) for v in config.shape.split("x"))
        if m % m1 or n % n1:
            raise ConfigError(f"kronecker shape {config.shape} does not divide {m}x{n} ({name})")
        shapes = [(m1, n1)]
    gram = chol @ chol.T
    best = min(
        (kronecker_fit(w, chol, m1, n1, rank, config, gram) for m1, n1 in shapes),
        key=lambda t: t[2],
    )
    return KroneckerLinear.from_parts(best[0], best[1], rank=rank, bias=bias)
