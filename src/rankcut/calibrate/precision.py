"""The precision of the model's own linear products while rankcut calibrates and compresses.

A compress runs the model over its calibration windows several times: the whole-model
statistics pass (forward, and a backward for the output Fisher) and the sequential
pipeline's block runs. Nearly all of that time is the model's ``F.linear`` products.
Where the hardware multiplies bfloat16 much faster than float32 (AMX or AVX512-BF16
CPUs, GPUs), ``compute_precision("bfloat16")`` computes each large float32 ``F.linear``
from bfloat16 copies of its input and weight (accumulated in float32 by the kernel) and
hands the output back in float32. Everything else stays as it was: norms, attention,
the residual stream and every statistic (Gram and cross products in float32, sums in
float64), the decompositions and the saved factors, all computed from float32 tensors.

This is an approximation of the calibration activations (each product's inputs rounded
to 8 significant bits, as the official SVD-LLM code profiles its models in float16),
not of the factorization: ``benchmarks/results/compress_time.md`` measures its effect
on perplexity next to its speed. ``float32`` computes exactly as without this module.

``resolve_compute_dtype("auto", device)`` picks ``bfloat16`` on a GPU that supports it
and on a CPU where a probe measures bfloat16 products at least ``AUTO_MIN_SPEEDUP``
times as fast as float32, else ``float32`` (an AVX2-only CPU emulates bfloat16 and
would be slower).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
#: ``auto`` takes bfloat16 when the probe measures it at least this much faster.
AUTO_MIN_SPEEDUP = 1.5
#: Products below these sizes stay float32: casting costs about as much as it saves
#: there (measured: a 576 x 2048 x 576 product is 1.7x faster in bfloat16, a 2048 x
#: 576 x 1536 one 4.2x, on an AMX CPU), and tiny models (the tests') compute exactly.
MIN_ROWS = 256
MIN_WEIGHT = 1 << 16
#: Most bytes of bfloat16 weight copies kept between calls (first come, first kept: the
#: model's weights are used in the same order on every batch, where a least-recently-used
#: cache smaller than the model would never hit). Weights past it are cast on each call.
CACHE_BYTES = 2 << 30


class LowPrecisionLinears(TorchFunctionMode):
    """While active, large float32 ``F.linear`` calls compute in ``dtype``, output float32.

    Weight copies are cached by tensor identity and checked against the tensor's
    version counter and storage, so an in-place update (``copy_``) or a new tensor is
    cast again; a write through ``.data`` is not seen, and nothing that runs inside
    this mode writes weights that way. A weight that needs a gradient is cast inside
    the graph on every call, so its gradient reaches it (in float32).

    Example:
        >>> lin = torch.nn.Linear(16, 8)
        >>> x = torch.randn(4, 16)
        >>> with LowPrecisionLinears(min_rows=1, min_weight=1):
        ...     y = lin(x)
        >>> y.dtype, torch.allclose(y, lin(x), atol=0.05)
        (torch.float32, True)
    """

    def __init__(
        self,
        dtype: torch.dtype = torch.bfloat16,
        *,
        min_rows: int = MIN_ROWS,
        min_weight: int = MIN_WEIGHT,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.min_rows = min_rows
        self.min_weight = min_weight
        self.cache_bytes = cache_bytes
        self._cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._cached_bytes = 0
        self.calls = 0  # products computed in ``dtype`` (for tests and reports)

    def _eligible(self, x: Tensor, weight: Tensor) -> bool:
        return (
            x.dtype == torch.float32
            and weight.dtype == torch.float32
            and weight.dim() == 2
            and weight.numel() >= self.min_weight
            and x.numel() >= self.min_rows * x.shape[-1]
        )

    def _weight(self, weight: Tensor) -> Tensor:
        if weight.requires_grad and torch.is_grad_enabled():
            return weight.to(self.dtype)  # in the graph: the gradient flows back to it
        stamp = (weight._version, weight.data_ptr())
        hit = self._cache.get(weight)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        low = weight.detach().to(self.dtype)
        size = low.numel() * low.element_size()
        if hit is not None:  # a stale copy: replace it
            self._cached_bytes -= hit[1].numel() * hit[1].element_size()
            del self._cache[weight]
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[weight] = (stamp, low)
            self._cached_bytes += size
        return low

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if self._eligible(x, weight):
                self.calls += 1
                y = F.linear(x.to(self.dtype), self._weight(weight)).to(torch.float32)
                return y if bias is None else y + bias
        return func(*args, **kwargs)


@contextmanager
def compute_precision(name: str) -> Iterator[LowPrecisionLinears | None]:
    """Run the block with the model's large linear products in ``name`` (a resolved
    ``COMPUTE_DTYPES`` entry other than ``auto``); ``float32`` changes nothing.

    Example:
        >>> with compute_precision("float32") as mode:
        ...     mode is None
        True
    """
    if name == "auto":
        raise ValueError("resolve 'auto' first (resolve_compute_dtype)")
    if name == "float32":
        yield None
        return
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    with LowPrecisionLinears(getattr(torch, name)) as mode:
        yield mode


def resolve_compute_dtype(name: str, device: torch.device | str | None = None) -> str:
    """``name``, or for ``auto`` the dtype this device computes fastest (see module).

    Example:
        >>> resolve_compute_dtype("float32")
        'float32'
        >>> resolve_compute_dtype("auto", "cpu") in ("float32", "bfloat16")
        True
    """
    if name != "auto":
        return name
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type != "cpu":
        return "float32"
    return "bfloat16" if bfloat16_speedup() >= AUTO_MIN_SPEEDUP else "float32"


@functools.cache
def bfloat16_speedup(size: int = 1024, repeats: int = 3) -> float:
    """float32 time over bfloat16 time of a ``size``-square CPU product (best of
    ``repeats`` each, after one warm-up), measured once per process (~0.1 s)."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)
