"""What kind of model this is, asked of the model itself (never of its name)."""

from __future__ import annotations

from torch import nn


def is_causal_lm(model: nn.Module) -> bool:
    """True for a model that generates text (a causal LM), False for an encoder.

    Transformers models answer ``can_generate()``; any other module counts as not causal.

    Example:
        >>> import torch
        >>> is_causal_lm(torch.nn.Linear(2, 2))
        False
    """
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate())
