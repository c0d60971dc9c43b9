"""Measured sensitivity: calibration-loss increase when one matrix alone is truncated."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import RankcutError
from ..layers import dense_weight
from ..models.adapter import adapter_for
from ..models.structure import model_device


@torch.no_grad()
def mean_loss(model: nn.Module, windows: Tensor) -> float:
    """Mean next-token loss of ``model`` on ``windows`` (one batch)."""
    device = model_device(model)
    ids = windows.to(device)
    mask = torch.ones_like(ids)
    out = model(**adapter_for(model).inputs(ids, attention_mask=mask, labels=ids, use_cache=False))
    if getattr(out, "loss", None) is None:
        raise RankcutError("sensitivity allocation needs a model with a language-modeling loss")
    return float(out.loss)


@torch.no_grad()
def loss_table(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor,
    truncate,
    candidates: list[float],
    progress: bool = True,
) -> dict[str, dict[float, float]]:
    """``{module: {ratio: loss increase}}``; ratio 0.0 (dense) always costs 0.

    ``truncate(name, weight, ratio)`` returns the approximated ``(out, in)`` matrix (or
    ``None`` when that ratio keeps the matrix dense). The weight is restored after
    every measurement.
    """
    was_training = model.training
    model.eval()
    base = mean_loss(model, windows)
    table: dict[str, dict[float, float]] = {}
    try:
        for name, module in tqdm(
            modules.items(), desc="sensitivity", disable=not progress, leave=False
        ):
            original = module.weight.detach().clone()
            weight = dense_weight(module).detach().to(torch.float64)
            row = {0.0: 0.0}
            for ratio in candidates:
                approx = truncate(name, weight, ratio)
                if approx is None:
                    continue
                new = approx.to(original.dtype)
                module.weight.copy_(new if isinstance(module, nn.Linear) else new.T)
                loss = mean_loss(model, windows)
                row[ratio] = loss - base if math.isfinite(loss) else float("inf")
                module.weight.copy_(original)
            table[name] = row
    finally:
        model.train(was_training)
    return table
