"""CUR: actual columns and rows of ``W`` picked by leverage scores, ``U`` by least squares."""

from __future__ import annotations

from dataclasses import dataclass

from ..decompose.cur import cur_decomposition
from ..errors import ConfigError
from ..layers import CURLinear
from .base import register_structure
from .common import WhitenedConfig, largest_fitting, weight_budget, whitening


@dataclass
class CurConfig(WhitenedConfig):
    """``W' = C U R`` with ``k`` actual columns and ``k`` actual rows of ``W``.

    Rows are chosen by leverage in the whitened space, columns by leverage of the
    activation-scaled weight, and ``U = C^+ (W S) (R S)^+`` minimizes the output error
    given them (see ``rankcut.decompose.cur``). ``k`` is the largest that fits the
    budget ``rank (out + in)`` (``k (out + in) + k^2`` values plus the indices), so CUR
    stores less than a rank-``rank`` product: it buys interpretability, not accuracy.

    Attributes:
        selection: ``top`` (deterministic: highest leverage) or ``sample`` (leverage
            sampling without replacement, seeded by ``seed``).
        seed: seed for ``sample``.
        energy: leverage is measured over the leading singular vectors holding this
            fraction of the (whitened) energy; being budget-independent, it makes a
            larger budget keep every row and column a smaller one chose.
    """

    selection: str = "top"
    seed: int = 0
    energy: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in ("top", "sample"):
            raise ConfigError(f"selection must be 'top' or 'sample', got {self.selection!r}")
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy}")


@register_structure(
    "cur",
    CurConfig,
    needs=("gram",),
    summary="CUR: actual rows/columns by leverage score, least-squares core (whitened)",
)
def cur(weight, stats, rank, config, name, bias=None):
    m, n = weight.shape
    chol = whitening(stats, config, name, weight.device)

    def make(k):
        return CURLinear(n, m, rank, k, k, bias=False, device="meta")

    k = largest_fitting(make, 1, min(m, n), weight_budget(m, n, rank))
    parts = cur_decomposition(
        weight,
        chol,
        k,
        k,
        sample=config.selection == "sample",
        seed=config.seed,
        energy=config.energy,
    )
    return CURLinear.from_parts(*parts, rank=rank, bias=bias)
