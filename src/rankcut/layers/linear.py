"""Uniform access to dense linear layers: ``nn.Linear`` and Hugging Face ``Conv1D``.

GPT-2's ``Conv1D`` stores its weight transposed, ``(in, out)``; everything in rankcut
works on the ``nn.Linear`` convention ``(out, in)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the math usable without it
        return None
    return Conv1D


def is_dense_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and HF ``Conv1D`` modules."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def dense_weight(module: nn.Module) -> Tensor:
    """The weight as ``(out_features, in_features)``, without copying when possible."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_dense_linear(module):
        return module.weight.T
    raise TypeError(f"not a dense linear layer: {type(module).__name__}")


def dense_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a dense linear layer."""
    out_features, in_features = dense_weight(module).shape
    return int(out_features), int(in_features)


def linear_from(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A dense ``nn.Linear`` holding copies of ``weight`` ``(out, in)`` and ``bias``."""
    out_features, in_features = weight.shape
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def like_original(linear: nn.Linear, original: nn.Module | None) -> nn.Module:
    """``linear`` in the layout of ``original`` (the dense module the architecture builds
    at that place): a Hugging Face ``Conv1D`` (weight stored ``(in, out)``, a bias always)
    when ``original`` is one, else ``linear`` itself. A merged checkpoint must store
    what the model class expects, or ``from_pretrained`` refuses its shapes.

    Example:
        >>> like_original(nn.Linear(3, 2), None).weight.shape
        torch.Size([2, 3])
    """
    conv1d = _conv1d_type()
    if conv1d is None or not isinstance(original, conv1d):
        return linear
    conv = conv1d(linear.out_features, linear.in_features)
    conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    return conv
