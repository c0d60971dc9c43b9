"""A context manager that owns forward hooks and always removes them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class HookManager:
    """Registers hooks and removes every one of them on exit, even after an error.

    Example:
        >>> import torch
        >>> seen = []
        >>> lin = torch.nn.Linear(2, 2)
        >>> with HookManager() as hooks:
        ...     hooks.forward(lin, lambda m, args, out: seen.append(out.shape))
        ...     _ = lin(torch.zeros(1, 2))
        >>> len(seen), len(lin._forward_hooks)
        (1, 0)
    """

    def __init__(self) -> None:
        self._handles: list = []

    def forward(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def forward_pre(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> HookManager:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
