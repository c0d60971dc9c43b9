"""Find decoder layers and target linears from the model's own structure.

No branching on model names: decoder layers are what the model's adapter
(``adapter.ModelAdapter``) finds, by default the repeated blocks the model declares in
``_no_split_modules`` (Hugging Face's unit for device placement), and failing that the
longest ``nn.ModuleList`` of same-typed modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import RankcutError
from ..layers import is_dense_linear
from .adapter import adapter_for


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Where ``model`` runs: the device of its first parameter (of its first buffer when
    it has none), else ``default``.

    Example:
        >>> model_device(torch.nn.Linear(2, 2)), model_device(torch.nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    for tensors in (model.parameters(), model.buffers()):
        for tensor in tensors:
            return tensor.device
    return torch.device(default)


def find_decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each repeated transformer block, in execution order, as the
    model's adapter (``adapter.adapter_for``) finds them.

    Example:
        >>> import torch
        >>> stack = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2))
        >>> [name for name, _ in find_decoder_layers(stack)]
        ['0.0', '0.1']
    """
    return adapter_for(model).blocks()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def find_targets(
    model: nn.Module,
    targets: list[str] | None = None,
    exclude: list[str] | None = None,
) -> dict[str, nn.Module]:
    """Dense linears to factorize, by qualified name.

    Args:
        model: the model.
        targets: regexes (``re.search``) over module names. ``None`` means every dense
            linear inside the decoder layers; embeddings and the LM head lie outside
            them and are therefore excluded by default.
        exclude: regexes removing names from the selection.

    Raises:
        RankcutError: when nothing matches; the message lists what exists.
    """
    from ..layers import LAYER_TYPES

    exclude = list(exclude or [])
    factorized = [n for n, m in model.named_modules() if isinstance(m, tuple(LAYER_TYPES.values()))]
    # The factors of an already factorized layer are nn.Linear too: never targets.
    linears = {
        n: m
        for n, m in model.named_modules()
        if is_dense_linear(m) and not any(n.startswith(f + ".") for f in factorized)
    }
    if targets is None:
        blocks = [name for name, _ in find_decoder_layers(model)]
        selected = {n: m for n, m in linears.items() if any(n.startswith(b + ".") for b in blocks)}
        looked_for = "dense linears inside decoder layers"
    else:
        selected = {n: m for n, m in linears.items() if _matches(n, targets)}
        looked_for = f"dense linears matching {targets}"
    selected = {n: m for n, m in selected.items() if not _matches(n, exclude)}
    if not selected:
        names = sorted(linears)
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise RankcutError(
            f"no target module found: looked for {looked_for}"
            + (f" excluding {exclude}" if exclude else "")
            + f"; the model has these dense linears: {shown or 'none'}"
        )
    return selected


def shared_weights(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Names among ``names`` whose weight is also used elsewhere (tied embeddings/heads).

    Factorizing a tied weight would untie it and grow the model, so such matrices stay dense.
    """
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [n for n in names if uses.get(id(model.get_submodule(n).weight), 0) > 1]


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which it holds it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_parent(model, name)
    setattr(parent, child, new)
