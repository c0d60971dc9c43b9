"""``CURLinear``: ``W' = C U R`` with ``C``/``R`` actual columns/rows of the original ``W``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import register_layer
from .structured import StructuredLinear, index_dtype


@register_layer
class CURLinear(StructuredLinear):
    """``y = C (U (R x))``: ``R`` ``(k, in)`` = rows ``row_idx`` of the original weight,
    ``C`` ``(out, c)`` = its columns ``col_idx``, ``U`` ``(c, k)`` the fitted core.

    The indices are stored (they say which output/input channels the layer reads from,
    the point of CUR) and counted as index storage. Costs ``c out + c k + k in`` values.

    Example:
        >>> import torch
        >>> from rankcut.decompose.cur import cur_decomposition
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> parts = cur_decomposition(w, torch.eye(4, dtype=torch.float64), 4, 4)
        >>> layer = CURLinear.from_parts(*parts, rank=4)
        >>> torch.allclose(layer.weight_product(), w)
        True
    """

    structure_fields = ("columns", "rows")

    def __init__(
        self, in_features, out_features, rank, columns, rows, bias=True, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        self.columns, self.rows = columns, rows
        kw = {"device": device, "dtype": dtype}
        self.c = nn.Parameter(torch.zeros(out_features, columns, **kw))
        self.u = nn.Parameter(torch.zeros(columns, rows, **kw))
        self.r = nn.Parameter(torch.zeros(rows, in_features, **kw))
        self.register_buffer(
            "col_idx", torch.zeros(columns, dtype=index_dtype(in_features), device=device)
        )
        self.register_buffer(
            "row_idx", torch.zeros(rows, dtype=index_dtype(out_features), device=device)
        )

    @classmethod
    def from_parts(
        cls,
        col_idx: Tensor,
        row_idx: Tensor,
        c: Tensor,
        u: Tensor,
        r: Tensor,
        rank: int,
        bias: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> CURLinear:
        dtype = dtype or torch.float64
        layer = cls(
            r.shape[1],
            c.shape[0],
            rank,
            c.shape[1],
            r.shape[0],
            bias is not None,
            device=c.device,
            dtype=dtype,
        )
        with torch.no_grad():
            layer.c.copy_(c)
            layer.u.copy_(u)
            layer.r.copy_(r)
            layer.col_idx.copy_(col_idx)
            layer.row_idx.copy_(row_idx)
        return layer.set_bias(bias)

    def _forward(self, x: Tensor) -> Tensor:
        return x @ self.r.T @ self.u.T @ self.c.T

    def macs(self, tokens: int) -> int:
        """``tokens (k in + c k + out c)``: ``R``, then ``U``, then ``C`` (``c`` columns,
        ``k`` rows)."""
        rows, cols = self.rows, self.columns
        return tokens * (rows * self.in_features + cols * rows + self.out_features * cols)

    def weight_product(self) -> Tensor:
        return self.c @ self.u @ self.r
