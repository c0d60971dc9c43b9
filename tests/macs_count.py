"""Count the multiply-adds a forward really executes, from the aten ops it dispatches.

Independent of the layers' own ``macs()``: a ``TorchDispatchMode`` sees every aten op
the code runs (after ``matmul``/``einsum``/``linear`` have been lowered) and counts the
products by their operands' shapes. ``torch.utils.flop_counter.FlopCounterMode`` counts
``mm``/``addmm``/``bmm``/``baddbmm`` only (2 FLOPs per multiply-add), not ``mv``, CSR
products or the element-wise products of a gather, so the rules are written out here.
Any other op that looks like a product makes the counter fail instead of counting 0.
"""

from __future__ import annotations

import re

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Names of aten ops that multiply matrices or vectors, to catch what the rules miss.
_PRODUCT_LIKE = re.compile(r"mm|mv|dot|matmul|linear|einsum|conv|addr|outer|kron|tensordot")


def _nnz_or_numel(t: torch.Tensor) -> int:
    return t._nnz() if t.layout != torch.strided else t.numel()


def _mm(a: torch.Tensor, b: torch.Tensor) -> int:
    """``(M, K) @ (K, N)``: ``M K N``, or one multiply-add per stored entry of a sparse
    operand and column (row) of the dense one."""
    (m, k), (_, n) = a.shape, b.shape
    if a.layout != torch.strided:
        return _nnz_or_numel(a) * n
    if b.layout != torch.strided:
        return m * _nnz_or_numel(b)
    return m * k * n


def _bmm(a: torch.Tensor, b: torch.Tensor) -> int:
    (batch, m, k), (_, _, n) = a.shape, b.shape
    return batch * m * k * n


def _mv(a: torch.Tensor, v: torch.Tensor) -> int:
    return _nnz_or_numel(a) if a.layout != torch.strided else a.shape[0] * a.shape[1]


def _mul(a, b, out: torch.Tensor) -> int:
    # An element-wise product of two floating tensors (a gather path: values times the
    # gathered entries, summed afterwards) is one multiply-add per output element; a
    # product with a Python number, or of integer index tensors, is no MAC.
    tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    if tensors and a.is_floating_point() and b.is_floating_point() and a.ndim and b.ndim:
        return out.numel()
    return 0


#: aten op name -> multiply-adds from (args, out).
RULES = {
    "mm": lambda args, out: _mm(args[0], args[1]),
    "addmm": lambda args, out: _mm(args[1], args[2]),
    "_sparse_addmm": lambda args, out: _mm(args[1], args[2]),
    "_sparse_mm": lambda args, out: _mm(args[0], args[1]),
    "bmm": lambda args, out: _bmm(args[0], args[1]),
    "baddbmm": lambda args, out: _bmm(args[1], args[2]),
    "mv": lambda args, out: _mv(args[0], args[1]),
    "addmv": lambda args, out: _mv(args[1], args[2]),
    "dot": lambda args, out: args[0].numel(),
    "mul": lambda args, out: _mul(args[0], args[1], out),
}


class CountMacs(TorchDispatchMode):
    """``with CountMacs() as c: f()``: ``c.macs`` multiply-adds, ``c.products`` the
    ``(op, operand shapes)`` of every op that did some, in order.

    Example:
        >>> with CountMacs() as count:
        ...     _ = torch.nn.functional.linear(torch.randn(3, 4), torch.randn(5, 4))
        >>> count.macs, count.products
        (60, [('mm', [(3, 4), (4, 5)])])
    """

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.products: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        rule = RULES.get(name)
        if rule is None:
            if _PRODUCT_LIKE.search(name):
                raise AssertionError(f"CountMacs has no rule for aten.{name}: add one")
            return out
        macs = rule(args, out)
        if macs:
            self.macs += macs
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.products.append((name, shapes))
        return out


def count_macs(fn, *args, **kwargs) -> CountMacs:
    """Run ``fn(*args, **kwargs)`` without autograd and return its ``CountMacs``."""
    with torch.no_grad(), CountMacs() as counter:
        fn(*args, **kwargs)
    return counter
