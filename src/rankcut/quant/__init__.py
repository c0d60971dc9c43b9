"""Low rank with quantization: the home of quantized factors and byte budgets.

A quantizer maps a float matrix to integer codes plus scales and back; quantized
factors, low rank + quantized residual and budgets in bytes will use the registered
ones (the math lives in ``rankcut.decompose.quantize``; torchao / torch int kernels do
the fast inference). A quantizer is added with ``@register_quantizer("name", bits=...)``
on a ``quantize(weight) -> (codes, scale)`` function whose inverse is ``dequantize``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..decompose.quantize import absmax_quantize, dequantize
from ..errors import ConfigError


@dataclass(frozen=True)
class Quantizer:
    """A registered quantizer: ``quantize(weight) -> (codes, scale)`` at ``bits`` bits."""

    name: str
    bits: int
    quantize: Callable[[Tensor], tuple[Tensor, Tensor]]

    def round_trip(self, weight: Tensor) -> Tensor:
        """``weight`` quantized and dequantized (what inference would compute with)."""
        return dequantize(*self.quantize(weight))

    def bytes_per_value(self) -> float:
        """Storage of one code, in bytes (scales are counted by the layer)."""
        return self.bits / 8


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(name: str, bits: int):
    """Register ``quantize(weight) -> (codes, scale)`` as ``name``.

    Example:
        >>> @register_quantizer("int6", bits=6)
        ... def int6(weight):
        ...     return absmax_quantize(weight, 6)
        >>> QUANTIZERS.pop("int6").bits
        6
    """

    def wrap(fn: Callable[[Tensor], tuple[Tensor, Tensor]]):
        QUANTIZERS[name] = Quantizer(name, bits, fn)
        return fn

    return wrap


@register_quantizer("int8", bits=8)
def int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 (the plain-int8 baseline)."""
    return absmax_quantize(weight, 8)


@register_quantizer("int4", bits=4)
def int4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int4 codes (held in int8 until packed kernels use them)."""
    return absmax_quantize(weight, 4)


def get_quantizer(name: str) -> Quantizer:
    if name not in QUANTIZERS:
        raise ConfigError(f"unknown quantizer {name!r}; known: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name]


__all__ = ["QUANTIZERS", "Quantizer", "get_quantizer", "register_quantizer"]
