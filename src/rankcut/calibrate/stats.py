"""Sufficient statistics of a linear layer's inputs, accumulated as data streams through.

Each batch's products are float32 matmuls (fast; a batch holds at most a few thousand
tokens, so each entry sums a few thousand float32 terms); the running sums across
batches are float64. Float64 is kept where it matters for stability: the sum over all
batches (tens of thousands of tokens, whose float32 rounding would reach the small
eigenvalues) and everything downstream of it, the Cholesky factor of a Gram that is
often ill-conditioned (dead or nearly collinear channels; ``psd_cholesky``) and the
whitened spectra computed from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..decompose.svd import all_finite

DEFAULT_EPS = 1e-6  # Cholesky shift used when none is given (the refit's, SVD-LLM's default)


def add_gram(acc: Tensor, a: Tensor, b: Tensor, rows: int | None = None) -> Tensor:
    """``acc += a^T b`` (``acc`` float64, ``a``/``b`` float32 ``(tokens, in)``), a block of
    ``rows`` output rows at a time: the temporaries (the float32 product and its float64
    cast) stay ``rows x in`` instead of ``in x in`` (121 + 242 MB for a 5504-wide input).
    By default a block holds about a million entries.

    A Gram (``b is a``) is symmetric: only the blocks on and below the diagonal are
    multiplied and each is mirrored above it, which saves up to half of the products
    (37.5 % with the four blocks a 576-wide input gets).

    Example:
        >>> x = torch.randn(50, 6)
        >>> acc = add_gram(torch.zeros(6, 6, dtype=torch.float64), x, x, rows=4)
        >>> torch.allclose(acc, (x.T @ x).double(), atol=1e-5)
        True
    """
    width = b.shape[1]
    if b is a:
        return _add_symmetric_gram(acc, a, rows)
    rows = rows or max(1, (1 << 20) // max(width, 1))
    for i in range(0, a.shape[1], rows):
        acc[i : i + rows].add_(a[:, i : i + rows].T @ b)
    return acc


def _add_symmetric_gram(acc: Tensor, a: Tensor, rows: int | None) -> Tensor:
    """``acc += a^T a`` from the block rows' parts on and below the diagonal."""
    n = a.shape[1]
    # at least four block rows (the saving), at most a million entries per product
    rows = rows or max(64, min((1 << 20) // max(n, 1), -(-n // 4)))
    for i in range(0, n, rows):
        j = min(i + rows, n)
        product = a[:, i:j].T @ a[:, :j]  # block row i, up to the end of its diagonal block
        acc[i:j, :j].add_(product)
        if i:
            acc[:i, i:j].add_(product[:, :i].T)  # the mirror of the part left of the diagonal
    return acc


@dataclass
class InputStats:
    """Gram matrix ``X^T X`` and/or mean absolute activation per input channel."""

    in_features: int
    gram: Tensor | None = None
    abs_sum: Tensor | None = None
    tokens: int = 0
    want_gram: bool = True
    want_abs: bool = False
    #: Derived quantities (e.g. a Cholesky factor) that modules sharing this input reuse.
    cache: dict = field(default_factory=dict, repr=False)

    def update(self, x: Tensor) -> None:
        # One batch's products in float32 (fast; a few thousand terms per entry), the
        # running sums across batches in float64 (exact enough for Cholesky).
        x = x.detach().reshape(-1, self.in_features).float()
        if self.want_gram:
            if self.gram is None:
                self.gram = x.new_zeros((self.in_features,) * 2, dtype=torch.float64)
            add_gram(self.gram, x, x)  # float32 products into the float64 sum, by blocks
        if self.want_abs:
            a = x.abs().sum(0, dtype=torch.float64)
            self.abs_sum = a if self.abs_sum is None else self.abs_sum.add_(a)
        self.tokens += x.shape[0]

    def _require_gram(self, name: str, why: str) -> None:
        if self.gram is None:
            from ..errors import RankcutError

            raise RankcutError(f"no Gram matrix for {name or 'this input'} ({why})")

    def cholesky(self, eps: float = DEFAULT_EPS, name: str = "") -> Tensor:
        """Cholesky factor of the Gram matrix, computed once per ``eps`` and shared by
        every module reading this input (allocation spectra and SVD-LLM factors alike)."""
        from ..decompose import psd_cholesky

        key = ("chol", eps)
        if key not in self.cache:
            self._require_gram(
                name,
                f"not gathered, or released after its Cholesky factor for another eps than {eps}",
            )
            self.cache[key] = psd_cholesky(self.gram, eps=eps, name=name)
        return self.cache[key]

    def damped_cholesky(self, damp: float, name: str = "") -> tuple[Tensor, float]:
        """``(L, lam)``: the Cholesky factor of ``X^T X + lam I`` with ``lam = damp *
        mean(diag X^T X)`` (a ridge of that strength), computed once per ``damp``."""
        from ..decompose import psd_cholesky

        if damp == 0:  # the plain factor (shared with a method whitening at that eps)
            return self.cholesky(DEFAULT_EPS, name), 0.0
        key = ("damped", damp)
        if key not in self.cache:
            self._require_gram(name, f"released before its damped factor for damp {damp} was made")
            diagonal = self.gram.diagonal()
            lam = damp * float(diagonal.mean())
            diagonal.add_(lam)  # in place (no second (in, in) matrix), undone below
            try:
                chol = psd_cholesky(self.gram, eps=DEFAULT_EPS, name=name)
            finally:
                diagonal.sub_(lam)
            self.cache[key] = (chol, lam)
        return self.cache[key]

    @property
    def has_gram(self) -> bool:
        """The Gram matrix, or a Cholesky factor of it, is available."""
        return self.gram is not None or any(k[0] == "chol" for k in self.cache)

    def release_gram(
        self,
        keep_eps: tuple[float, ...] = (DEFAULT_EPS,),
        name: str = "",
        keep_damped: tuple[float, ...] = (),
    ) -> None:
        """Factor the Gram for each ``keep_eps`` (``cholesky``) and ``keep_damped``
        (``damped_cholesky``), then drop it to save an (in, in) float64."""
        if self.gram is None:
            return
        for eps in keep_eps:
            self.cholesky(eps, name)
        for damp in keep_damped:
            self.damped_cholesky(damp, name)
        self.gram = None

    @property
    def abs_mean(self) -> Tensor | None:
        return None if self.abs_sum is None else self.abs_sum / max(self.tokens, 1)

    def check_finite(self, name: str) -> None:
        from ..errors import RankcutError

        for label, t in (("Gram matrix", self.gram), ("activation mean", self.abs_sum)):
            if t is not None and not all_finite(t):
                raise RankcutError(
                    f"non-finite {label} for {name}: the model's weights or activations "
                    "hold NaN or infinity (check the checkpoint, or use a wider dtype)"
                )


@dataclass
class LayerStats:
    """Everything a method may use about one target layer."""

    inputs: InputStats | None = None
    fisher_in: Tensor | None = None  # (in,) summed squared weight gradients per input channel
    fisher_out: Tensor | None = None  # (out,) summed squared gradients of the layer's output
