"""Parameter counts of (possibly factorized) models."""

from __future__ import annotations

from torch import nn

from ..layers import factorized_modules


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields each shared tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def param_summary(model: nn.Module) -> dict[str, int]:
    """``params_total`` now and ``params_dense_equivalent`` before any factorization."""
    layers = factorized_modules(model)
    # Index buffers of sparse layers are storage too (see rankcut.layers.base).
    total = count_params(model) + sum(m.index_params() for _, m in layers)
    dense = total + sum(m.dense_params() - m.num_params() for _, m in layers)
    return {"params_total": total, "params_dense_equivalent": dense}
