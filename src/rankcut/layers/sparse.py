"""Layers with a sparse part: ``SparseLowRankLinear`` (``U V + S``) and ``SparseDenseLinear`` (``C D``)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .base import register_layer
from .structured import StructuredLinear, index_dtype

# CSR matmul is stable enough for inference and fine-tuning of the values; torch warns
# that the format is "beta" on first use, which would surprise every user of svd-sparse.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@register_layer
class SparseLowRankLinear(StructuredLinear):
    """``y = up(down(x)) + S x`` with ``S`` a CSR matrix of ``nnz`` entries (SLTrain form).

    Stored: ``up`` ``(out, r)``, ``down`` ``(r, in)``, ``values`` ``(nnz,)`` and the CSR
    index buffers ``crow`` ``(out + 1,)`` and ``col`` ``(nnz,)`` in the smallest integer
    types that hold them (counted as index storage). The sparse product runs as a
    ``torch.sparse`` CSR matmul; the dense ``S`` is never built in ``forward``.

    Example:
        >>> import torch
        >>> layer = SparseLowRankLinear(4, 3, rank=2, low_rank=1, nnz=2, bias=False)
        >>> layer.num_params()  # 1*(3+4) values + 2 values + crow 4 x 1 B + col 2 x 1 B
        11
    """

    structure_fields = ("low_rank", "nnz")

    def __init__(
        self, in_features, out_features, rank, low_rank, nnz, bias=True, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        self.low_rank, self.nnz = low_rank, nnz
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Parameter(torch.zeros(out_features, low_rank, **kw))
        self.down = nn.Parameter(torch.zeros(low_rank, in_features, **kw))
        self.values = nn.Parameter(torch.zeros(nnz, **kw))
        crow_dtype = index_dtype(nnz + 1)
        self.register_buffer("crow", torch.zeros(out_features + 1, dtype=crow_dtype, device=device))
        self.register_buffer("col", torch.zeros(nnz, dtype=index_dtype(in_features), device=device))

    @classmethod
    def from_parts(
        cls,
        up: Tensor,
        down: Tensor,
        rows: Tensor,
        cols: Tensor,
        values: Tensor,
        rank: int,
        bias: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> SparseLowRankLinear:
        """From the factors and COO entries sorted row-major."""
        m, n = up.shape[0], down.shape[1]
        layer = cls(
            n,
            m,
            rank,
            up.shape[1],
            values.numel(),
            bias is not None,
            device=up.device,
            dtype=dtype or torch.float64,
        )
        crow = torch.zeros(m + 1, dtype=torch.long, device=up.device)
        crow[1:] = torch.cumsum(torch.bincount(rows.long(), minlength=m), 0)
        with torch.no_grad():
            layer.up.copy_(up)
            layer.down.copy_(down)
            layer.values.copy_(values)
            layer.crow.copy_(crow)
            layer.col.copy_(cols)
        return layer.set_bias(bias)

    def sparse_matrix(self) -> Tensor:
        return torch.sparse_csr_tensor(
            self.crow.to(torch.int32),
            self.col.to(torch.int32),
            self.values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )

    def _forward(self, x: Tensor) -> Tensor:
        y = x @ self.down.T @ self.up.T
        if self.nnz:
            flat = x.reshape(-1, self.in_features)
            sp = torch.sparse.mm(self.sparse_matrix(), flat.T).T
            y = y + sp.reshape(y.shape)
        return y

    def macs(self, tokens: int) -> int:
        """``tokens (r (in + out) + nnz)``: the two factors, then one multiply-add per
        stored entry of ``S`` and token (the CSR product touches only those)."""
        low_rank = self.low_rank * (self.in_features + self.out_features)
        return tokens * (low_rank + self.nnz)

    def weight_product(self) -> Tensor:
        return self.up @ self.down + self.sparse_matrix().to_dense()


@register_layer
class SparseDenseLinear(StructuredLinear):
    """``y = C (D x)``: dense ``D`` ``(k, in)``, row-sparse ``C`` ``(out, k)``.

    Every row of ``C`` holds ``count`` nonzeros: anywhere in the row (``group == 0``: a
    sparse dictionary code, CoSpaDi) or ``N = count M / k`` in every group of ``M``
    consecutive entries (``N:M`` semi-structured, DSFormer). Stored: ``d``, ``values``
    ``(out, count)`` and ``idx`` ``(out, count)`` = atom indices (``group == 0``) or
    positions inside the group (``uint8``).

    ``forward`` never builds the dense ``(out, in)`` weight: for a few tokens it gathers
    ``count`` entries of ``D x`` per output; for larger batches it scatters ``C`` into a
    dense ``(out, k)`` factor and does one matmul (CPU has no semi-structured kernel).

    Example:
        >>> import torch
        >>> layer = SparseDenseLinear(6, 4, rank=2, k=4, count=2, group=4, bias=False)
        >>> layer.num_params()  # d 4*6 + values 4*2 + idx 8 x 1 byte / 4
        34
    """

    structure_fields = ("k", "count", "group")

    #: Token count up to which ``forward`` gathers instead of scattering ``C``.
    gather_max_tokens = 8

    def __init__(
        self,
        in_features,
        out_features,
        rank,
        k,
        count,
        group=0,
        bias=True,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        if group and (k % group or (count * group) % k):
            raise ValueError(f"N:M needs M | k and N = count M / k integral (k={k}, M={group})")
        self.k, self.count, self.group = k, count, group
        kw = {"device": device, "dtype": dtype}
        self.d = nn.Parameter(torch.zeros(k, in_features, **kw))
        self.values = nn.Parameter(torch.zeros(out_features, count, **kw))
        limit = group if group else k
        self.register_buffer(
            "idx", torch.zeros(out_features, count, dtype=index_dtype(limit), device=device)
        )

    @classmethod
    def from_parts(
        cls,
        idx: Tensor,
        values: Tensor,
        d: Tensor,
        rank: int,
        group: int = 0,
        bias: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> SparseDenseLinear:
        """From absolute (sorted) indices ``(out, count)``, their values and ``D``."""
        k, n = d.shape
        m, count = idx.shape
        layer = cls(
            n,
            m,
            rank,
            k,
            count,
            group,
            bias is not None,
            device=d.device,
            dtype=dtype or torch.float64,
        )
        stored = idx - layer._group_base() if group else idx
        with torch.no_grad():
            layer.d.copy_(d)
            layer.values.copy_(values)
            layer.idx.copy_(stored)
        return layer.set_bias(bias)

    def _group_base(self) -> Tensor:
        n_per = self.count * self.group // self.k
        return (torch.arange(self.count, device=self.idx.device) // n_per) * self.group

    def absolute_idx(self) -> Tensor:
        idx = self.idx.long()
        return idx + self._group_base() if self.group else idx

    def sparse_factor(self) -> Tensor:
        """The ``(out, k)`` factor ``C`` as a dense matrix (small: ``k`` columns)."""
        c = torch.zeros(
            self.out_features, self.k, dtype=self.values.dtype, device=self.values.device
        )
        return c.scatter(1, self.absolute_idx(), self.values)

    def gathers_for(self, tokens: int) -> bool:
        """Whether a batch of ``tokens`` gathers ``D x`` entries instead of scattering ``C``."""
        return tokens <= self.gather_max_tokens

    def macs(self, tokens: int) -> int:
        """``tokens k in`` for ``D x``, then ``tokens out count`` (gathering: only the
        nonzeros of ``C``) or ``tokens out k`` (one matmul with the scattered ``C``)."""
        per_output = self.count if self.gathers_for(tokens) else self.k
        return tokens * (self.k * self.in_features + self.out_features * per_output)

    def _forward(self, x: Tensor) -> Tensor:
        z = x @ self.d.T
        if self.gathers_for(z.numel() // self.k):
            return (z[..., self.absolute_idx()] * self.values).sum(-1)
        return z @ self.sparse_factor().T

    def weight_product(self) -> Tensor:
        return self.sparse_factor() @ self.d
