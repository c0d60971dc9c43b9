"""Low-rank adaptation: the home of rankcut's adapters beside peft's LoRA family.

peft's own tuners (LoRA, LoKr, ...) are used through peft. Adapters peft does not have
(wavelet-domain WaRA, Kronecker SoKA with a KPSVD start, ...) are added as one module
each in this package: a config dataclass and an ``inject(model, config) -> model``
function registered with ``@register_adapter_method("name", Config)``; their layers
follow the layer contract in ``rankcut.layers`` (``adapter_targets()`` says what an
adapter may wrap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class AdapterMethod:
    """A registered adapter: its config type and the function that injects it."""

    name: str
    config_cls: type
    inject: Callable


ADAPTER_METHODS: dict[str, AdapterMethod] = {}


def register_adapter_method(name: str, config_cls: type) -> Callable[[Callable], Callable]:
    """Register ``inject(model, config) -> model`` for configs of ``config_cls``.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class NoopConfig:
        ...     r: int = 1
        >>> @register_adapter_method("noop", NoopConfig)
        ... def inject(model, config):
        ...     return model
        >>> ADAPTER_METHODS.pop("noop").config_cls.__name__
        'NoopConfig'
    """

    def wrap(fn: Callable) -> Callable:
        ADAPTER_METHODS[name] = AdapterMethod(name, config_cls, fn)
        return fn

    return wrap


def get_adapter_method(name: str) -> AdapterMethod:
    if name not in ADAPTER_METHODS:
        known = ", ".join(sorted(ADAPTER_METHODS)) or "none yet"
        raise ConfigError(f"unknown adapter {name!r}; known: {known}")
    return ADAPTER_METHODS[name]


__all__ = ["ADAPTER_METHODS", "AdapterMethod", "get_adapter_method", "register_adapter_method"]
