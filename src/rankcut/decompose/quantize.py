"""Uniform integer quantization of a matrix (pure math: tensors in, tensors out)."""

from __future__ import annotations

import torch
from torch import Tensor


def absmax_quantize(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization: ``weight ~ codes * scale[:, None]``.

    Each row is scaled so its largest magnitude maps to ``2^(bits-1) - 1``; codes are
    rounded to nearest and stored as ``int8`` (``bits <= 8``).

    Args:
        weight: ``(rows, cols)`` floating-point matrix.
        bits: 2 to 8.

    Returns:
        ``(codes, scale)``: ``int8`` codes of ``weight``'s shape, and one float scale
        per row (of ``weight``'s dtype).

    Example:
        >>> w = torch.tensor([[1.0, -0.5], [0.25, 0.0]])
        >>> codes, scale = absmax_quantize(w, 8)
        >>> codes.tolist()
        [[127, -64], [127, 0]]
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    top = 2 ** (bits - 1) - 1
    absmax = weight.abs().amax(dim=1)
    # An all-zero row keeps scale 1: its codes are zero either way.
    scale = torch.where(absmax > 0, absmax / top, torch.ones_like(absmax))
    codes = torch.clamp(torch.round(weight / scale[:, None]), -top, top).to(torch.int8)
    return codes, scale


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """The matrix ``codes * scale[:, None]`` that ``absmax_quantize`` approximates."""
    return codes.to(scale.dtype) * scale[:, None]
