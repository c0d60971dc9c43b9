"""``KroneckerLinear``: ``W' = sum_k A_k (x) B_k``, applied without forming ``W'``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import register_layer
from .structured import StructuredLinear


@register_layer
class KroneckerLinear(StructuredLinear):
    """A sum of ``terms`` Kronecker products, ``A_k`` ``(m1, n1)``, ``B_k`` ``(m2, n2)``.

    Forward uses ``(A (x) B) vec(X) = vec(A X B^T)`` with the input reshaped to
    ``(n1, n2)`` (row-major): two batched matmuls, contracting first with whichever
    factor gives the smaller intermediate (``K m1 n2`` or ``K n1 m2`` values per token):
    ``K (m1 n1 n2 + m1 n2 m2)`` or ``K (n1 n2 m2 + m1 n1 m2)`` multiply-adds per token
    (``factored_macs``) instead of ``m n``, which is *more* than dense once ``K`` is in
    the hundreds. For a batch of ``T`` tokens where ``T factored_macs > K m n + T m n``,
    building ``W'`` once (``K m n`` multiply-adds, transient, differentiable) and applying
    it is cheaper, and the forward does that unless ``allow_rebuild`` is False (``macs``
    counts whichever path a batch takes). Stores ``K (m1 n1 + m2 n2)``.

    Example:
        >>> import torch
        >>> a, b = torch.randn(2, 3, 2), torch.randn(2, 2, 5)
        >>> layer = KroneckerLinear.from_parts(a, b, rank=2, dtype=torch.float32)
        >>> x = torch.randn(4, 10)
        >>> torch.allclose(layer(x), x @ layer.weight_product().T, atol=1e-5)
        True
    """

    structure_fields = ("m1", "n1", "terms")

    def __init__(
        self, in_features, out_features, rank, m1, n1, terms, bias=True, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        if out_features % m1 or in_features % n1:
            raise ValueError(f"({m1}, {n1}) does not divide ({out_features}, {in_features})")
        self.m1, self.n1, self.terms = m1, n1, terms
        self.m2, self.n2 = out_features // m1, in_features // n1
        kw = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.zeros(terms, m1, self.n1, **kw))
        self.b = nn.Parameter(torch.zeros(terms, self.m2, self.n2, **kw))

    @classmethod
    def from_parts(
        cls,
        a: Tensor,
        b: Tensor,
        rank: int,
        bias: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> KroneckerLinear:
        k, m1, n1 = a.shape
        _, m2, n2 = b.shape
        layer = cls(
            n1 * n2,
            m1 * m2,
            rank,
            m1,
            n1,
            k,
            bias is not None,
            device=a.device,
            dtype=dtype or torch.float64,
        )
        with torch.no_grad():
            layer.a.copy_(a)
            layer.b.copy_(b)
        return layer.set_bias(bias)

    #: Rebuild ``W'`` for a batch when that takes fewer multiply-adds (see the class doc).
    allow_rebuild: bool = True

    def _a_first(self) -> bool:
        """The factored forward contracts with ``A`` first (its intermediate is smaller)."""
        return self.m1 * self.n2 < self.n1 * self.m2

    def factored_macs(self) -> int:
        """Multiply-adds per token of the factored forward, in the order it contracts.

        For the factor shapes ``kronecker_shapes`` ranks first on LLM matrices, the
        smaller intermediate is also the cheaper order; for others it need not be, and
        this counts the order the forward takes.
        """
        k, m1, n1, m2, n2 = self.terms, self.m1, self.n1, self.m2, self.n2
        if self._a_first():
            return k * (m1 * n1 * n2 + m1 * n2 * m2)
        return k * (n1 * n2 * m2 + m1 * n1 * m2)

    def macs(self, tokens: int) -> int:
        """``tokens factored_macs()``, or ``K m n + tokens m n`` where the batch rebuilds ``W'``."""
        if self.rebuilds_for(tokens):
            dense = self.out_features * self.in_features
            return (self.terms + tokens) * dense
        return tokens * self.factored_macs()

    def rebuilds_for(self, tokens: int) -> bool:
        """Whether a batch of ``tokens`` goes through the rebuilt ``W'``."""
        dense = self.out_features * self.in_features
        return self.allow_rebuild and tokens * self.factored_macs() > (self.terms + tokens) * dense

    def _forward(self, x: Tensor) -> Tensor:
        if self.rebuilds_for(x.numel() // self.in_features):
            return x @ self.weight_product().T
        return self._factored(x)

    def _factored(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        k, m1, n1, m2, n2 = self.terms, self.m1, self.n1, self.m2, self.n2
        xs = x.reshape(-1, n1, n2)
        if self._a_first():  # contract with A first: the smaller intermediate
            # Z[t, (k, i), q] = sum_j A_k[i, j] X[t, j, q]
            z = self.a.reshape(k * m1, n1) @ xs
            z = z.reshape(-1, k, m1, n2).permute(0, 2, 1, 3).reshape(-1, m1, k * n2)
            # Y[t, i, p] = sum_{k, q} Z[t, i, (k, q)] B_k[p, q]
            b_cat = self.b.permute(1, 0, 2).reshape(m2, k * n2)
            return (z @ b_cat.T).reshape(*lead, m1 * m2)
        # Z[t, j, (k, p)] = sum_q X[t, j, q] B_k[p, q]
        z = xs @ self.b.reshape(k * m2, n2).T
        z = z.reshape(-1, n1, k, m2).permute(0, 2, 1, 3).reshape(-1, k * n1, m2)
        # Y[t, i, p] = sum_{k, j} A_k[i, j] Z[t, (k, j), p]
        a_cat = self.a.permute(1, 0, 2).reshape(m1, k * n1)
        y = a_cat @ z
        return y.reshape(*lead, m1 * m2)

    def weight_product(self) -> Tensor:
        from ..decompose.kronecker import kron_sum

        return kron_sum(self.a, self.b)
