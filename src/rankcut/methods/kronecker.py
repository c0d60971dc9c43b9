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
from .common import WhitenedConfig, weight_budget, whitening

TERM_RULES = ("budget", "energy", "elbow")
WHITEN = ("auto", "kron", "none")


@dataclass
class KroneckerConfig(WhitenedConfig):
    """``W' = sum_k A_k (x) B_k`` (SoKA's KPSVD).

    Each term costs ``m1 n1 + m2 n2``; the budget ``rank (out + in)`` caps the number of
    terms. Calibration uses the nearest Kronecker factorization ``G1 (x) G2`` of the
    input Gram, in whose coordinates the fit is exact (``rankcut.decompose.kronecker``).

    Attributes:
        shape: ``auto`` (from the divisors of ``out`` and ``in``: the cheapest terms
            first, see ``candidates``) or ``"M1xN1"`` for ``A_k`` of that shape.
        candidates: with ``auto``, how many of the cheapest factor shapes to fit; the
            one with the lowest output error wins.
        terms: the most terms to keep: ``budget`` (as many as the budget pays for),
            ``energy`` (the fewest keeping ``energy`` of the rearranged spectrum's
            energy, at most the budget) or ``elbow`` (the elbow of that spectrum, at most
            the budget). Below that cap, the prefix with the lowest true output error
            is kept (``best_prefix``): each fit is exact only for its own metric (the
            plain Frobenius norm, or the Kronecker-factored Gram ``G1 (x) G2``, far from
            the real Gram of an LLM's activations), so more terms can raise the real
            output error.
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


def prefix_grid(count: int) -> list[int]:
    """Term counts tried by ``best_prefix``: ``round(2^(i/2))`` below ``count``, and ``count``."""
    steps = {round(2 ** (i / 2)) for i in range(2 * max(count, 1).bit_length() + 1)}
    return sorted({k for k in steps if k < count} | {count})


def best_prefix(weight, a, b, chol) -> tuple[int, float]:
    """Among the prefixes ``prefix_grid(len(a))`` of a fit's terms (best first), the one
    with the lowest output error ``||(W - W') S||_F^2``: ``(terms, error)``.

    The partial sums grow term by term, so ``W'`` is built once (``K m n``
    multiply-adds) and each tried prefix costs one error evaluation (``m n^2``).
    """
    approx = torch.zeros_like(weight)
    done, best = 0, (0, float("inf"))
    for k in prefix_grid(a.shape[0]):
        approx += kron_sum(a[done:k], b[done:k])
        done = k
        err = whitened_error(weight, approx, chol)
        if err < best[1]:
            best = (k, err)
    return best


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
    scored = []
    for a, b in fits:
        k, err = best_prefix(weight, a, b, chol)
        scored.append((err, a[:k], b[:k]))
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
