"""The one contract every factorized layer keeps, and the registry that rebuilds them.

Everything outside ``rankcut.layers`` (saving and loading, parameter reports, the speed
theory, recovery fine-tuning) talks to a factorized layer through ``FactorizedLinear``
and never branches on its concrete type: a new layer is one subclass, decorated with
``register_layer``.

Parameter-count convention (``num_params`` counts exactly what the state dict holds):

- every stored *value* (a floating-point element: factors, sparse values, bias) counts 1;
- *index* tensors (integer buffers: sparse positions, selected rows/columns) count in
  units of a float32 value, i.e. by their bytes / 4: an ``int32`` index costs 1, an
  ``int16`` index 1/2, a ``uint8`` index 1/4; a layer's total index cost is rounded up
  to a whole parameter.

For a model kept in float32 (rankcut's default) this is the layer's size in bytes / 4.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from .linear import linear_from

#: Bytes of the unit in which index storage is counted (a float32 parameter).
UNIT_BYTES = 4

#: Layer types that ``rankcut.load`` (and streaming resume) rebuild from ``rankcut.json``,
#: by class name; filled by ``register_layer``.
LAYER_TYPES: dict[str, type[FactorizedLinear]] = {}


class FactorizedLinear(nn.Module, metaclass=abc.ABCMeta):
    """Base of every layer that replaces a dense ``(out, in)`` linear by factors.

    A subclass defines ``forward`` (which never stores the dense weight, and builds it
    only transiently where that costs fewer multiply-adds, as ``KroneckerLinear`` does
    for large batches), ``weight_product``, ``macs`` and, when its bias does not live in
    a ``bias`` parameter of its own, a ``bias`` property. Its constructor takes
    ``(in_features, out_features, rank, *fields, bias, device=, dtype=)``, where
    ``fields`` are the integer attributes named in ``structure_fields``: that is what
    ``structure()`` records and ``from_structure`` rebuilds.

    ``rank`` is the rank a ``LowRankLinear`` holds, and for other structures the *budget
    rank* an allocator gave: the layer stores at most about ``rank (in + out)`` values.

    Example:
        >>> from rankcut.layers import LowRankLinear
        >>> layer = LowRankLinear(8, 6, rank=2)
        >>> isinstance(layer, FactorizedLinear), layer.weight_params(), layer.macs(tokens=3)
        (True, 28, 84)
    """

    #: Integer constructor arguments after ``rank`` (and attributes of the same names).
    structure_fields: tuple[str, ...] = ()
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank

    # -- what each layer defines ------------------------------------------------------
    @abc.abstractmethod
    def weight_product(self) -> Tensor:
        """The dense ``(out, in)`` matrix this layer applies (for analysis and
        ``to_linear``; ``forward`` does not call it unless that is cheaper)."""

    @abc.abstractmethod
    def macs(self, tokens: int) -> int:
        """Multiply-adds that ``forward`` executes on ``tokens`` tokens (bias adds excluded).

        The true count of the path the forward takes for that many tokens, so it need not
        be linear in ``tokens`` (a layer may switch paths with the batch size).
        """

    def adapter_targets(self) -> dict[str, nn.Module]:
        """Sub-modules an adapter (peft LoRA) may wrap, by name relative to this layer.

        Empty when the layer holds its factors as plain parameters: LoRA has nothing to
        wrap then, and recovery trains the factors themselves (``trainable_parameters``).
        """
        return {}

    # -- the shared contract ----------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What a recovery fine-tune trains: the floating-point parameters (bias included).

        Integer index buffers (sparse positions, selected rows) are never among them:
        they fix the structure, and gradients do not exist for them.
        """
        return [p for p in self.parameters() if p.is_floating_point()]

    def has_bias(self) -> bool:
        """Whether the layer adds a bias."""
        return self.bias is not None

    def index_params(self) -> int:
        """Index storage in float32-parameter units, rounded up (see the module docstring)."""
        nbytes = sum(
            b.numel() * b.element_size() for b in self.buffers() if not b.is_floating_point()
        )
        return math.ceil(nbytes / UNIT_BYTES)

    def num_params(self) -> int:
        """Stored values (parameters, bias included) plus index storage."""
        return sum(p.numel() for p in self.parameters()) + self.index_params()

    def weight_params(self) -> int:
        """What the layer stores for its weight: ``num_params()`` less the bias."""
        bias = self.bias
        return self.num_params() - (bias.numel() if bias is not None else 0)

    def dense_params(self) -> int:
        """Parameters of the dense layer this one replaces (bias included)."""
        bias = self.out_features if self.has_bias() else 0
        return self.in_features * self.out_features + bias

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear``."""
        return linear_from(self.weight_product(), self.bias)

    def structure(self) -> dict:
        """What ``rankcut.json`` records to rebuild this layer."""
        return {
            "type": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.has_bias(),
            **self._structure(),
        }

    @classmethod
    def from_structure(
        cls,
        spec: dict,
        device: str | torch.device = "meta",
        dtype: torch.dtype | None = None,
    ) -> FactorizedLinear:
        """The layer ``structure()`` describes, uninitialized (on the meta device by default).

        Example:
            >>> from rankcut.layers import LowRankLinear
            >>> layer = LowRankLinear(5, 4, rank=2, bias=False)
            >>> LowRankLinear.from_structure(layer.structure()).structure() == layer.structure()
            True
        """
        return cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            int(spec["rank"]),
            *(int(spec[key]) for key in cls.structure_fields),
            bool(spec["bias"]),
            device=device,
            dtype=dtype,
        )

    def _structure(self) -> dict:
        return {key: getattr(self, key) for key in self.structure_fields}

    def extra_repr(self) -> str:
        fields = "".join(f"{k}={v}, " for k, v in self._structure().items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, {fields}bias={self.has_bias()}, params={self.num_params()}"
        )


def register_layer(cls: type[FactorizedLinear]) -> type[FactorizedLinear]:
    """Class decorator: make ``cls`` loadable by name (``LAYER_TYPES[cls.__name__]``).

    Saved models record each layer's class name (``structure()["type"]``), so a name,
    once registered, belongs to one class.

    Example:
        >>> from rankcut.layers import LAYER_TYPES, LowRankLinear
        >>> LAYER_TYPES["LowRankLinear"] is LowRankLinear
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, FactorizedLinear)):
        raise TypeError(f"register_layer takes a FactorizedLinear subclass, got {cls!r}")
    known = LAYER_TYPES.get(cls.__name__)
    if known is not None and known is not cls:
        raise ValueError(f"a layer type named {cls.__name__} is already registered: {known}")
    LAYER_TYPES[cls.__name__] = cls
    return cls


def factorized_modules(model: nn.Module) -> list[tuple[str, FactorizedLinear]]:
    """``(name, module)`` for every factorized layer in ``model``, in module order.

    Example:
        >>> from torch import nn
        >>> from rankcut.layers import LowRankLinear
        >>> model = nn.Sequential(nn.Linear(4, 4), LowRankLinear(4, 4, rank=1))
        >>> [name for name, _ in factorized_modules(model)]
        ['1']
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
