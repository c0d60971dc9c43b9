"""Whole-model calibration: run windows through the model, hooks gather statistics.

Modules that read the same input tensor (q/k/v projections, gate/up projections) are
detected at run time by tensor identity and share one statistic.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import RankcutError
from ..layers import dense_shape
from .hooks import HookManager
from .stats import InputStats, LayerStats

logger = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, ids: Tensor, **kwargs):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor,
    gram: bool = True,
    abs_mean: bool = False,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, InputStats]:
    """Input statistics of each module in ``modules`` over the calibration ``windows``.

    Returns a mapping from module name to its ``InputStats``; modules that share an
    input map to the same object.
    """
    device = _model_device(model)
    shared: dict[str, InputStats] = {}
    owner_of: dict[str, str] = {}  # module name -> name of the module whose stats it shares
    seen: list[tuple[Tensor, str]] = []  # inputs of the current batch (kept alive on purpose)

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0]
            for tensor, first in seen:
                if tensor is x:
                    owner_of.setdefault(name, first)
                    if owner_of[name] != first:
                        raise RankcutError(f"{name} changed the input it shares across batches")
                    return
            if owner_of.get(name, name) != name:
                raise RankcutError(f"{name} stopped sharing its input with {owner_of[name]}")
            seen.append((x, name))
            if name not in shared:
                shared[name] = InputStats(dense_shape(module)[1], want_gram=gram, want_abs=abs_mean)
            shared[name].update(x)

        return hook

    was_training = model.training
    model.eval()
    with HookManager() as hooks:
        for name, module in modules.items():
            hooks.forward(module, make_hook(name))
        batches = windows.split(batch_size)
        for batch in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
            seen.clear()
            _forward(model, batch.to(device))
        seen.clear()
    model.train(was_training)
    result = {}
    for name in modules:
        key = owner_of.get(name, name)
        if key not in shared:
            raise RankcutError(f"module {name} received no input during calibration")
        result[name] = shared[key]
    for name, stats in shared.items():
        stats.check_finite(name)
    groups = len(shared)
    logger.info("collected input statistics: %d modules, %d distinct inputs", len(result), groups)
    return result


def collect_fisher(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Empirical Fisher information of each weight, summed over output rows.

    For every calibration window (one sample at a time, so squares are per-sample) the
    LM loss is back-propagated and ``grad(W)**2`` is accumulated. The result per module
    is a vector over *input* channels: ``F_j = sum_samples sum_i (dL/dW_ij)^2``.

    Raises:
        RankcutError: if the model has no language-modeling loss.
    """
    device = _model_device(model)
    weights = {name: m.weight for name, m in modules.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deployed model
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    fisher = {
        name: torch.zeros(dense_shape(m)[1], dtype=torch.float64, device=device)
        for name, m in modules.items()
    }
    try:
        for row in tqdm(windows.split(1), desc="fisher", disable=not progress, leave=False):
            ids = row.to(device)
            out = _forward(model, ids, labels=ids)
            if getattr(out, "loss", None) is None:
                raise RankcutError("fwsvd needs a model with a language-modeling head and loss")
            out.loss.backward()
            for name, module in modules.items():
                grad = module.weight.grad
                if grad is None:
                    raise RankcutError(f"no gradient reached {name}")
                if not isinstance(module, nn.Linear):  # Conv1D stores (in, out)
                    grad = grad.T
                fisher[name] += grad.detach().to(torch.float64).pow(2).sum(0)
                module.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    for name, f in fisher.items():
        if not bool(torch.isfinite(f).all()):
            raise RankcutError(f"non-finite Fisher information for {name}")
    return fisher


def collect_layer_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor | None,
    needs: frozenset[str],
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Gather what a method ``needs`` (``gram``, ``abs_mean``, ``fisher``) for each module."""
    stats = {name: LayerStats() for name in modules}
    if not needs or not modules:
        return stats
    if windows is None:
        raise RankcutError(f"this method needs calibration data ({', '.join(sorted(needs))})")
    if "gram" in needs or "abs_mean" in needs:
        inputs = collect_input_stats(
            model,
            modules,
            windows,
            gram="gram" in needs,
            abs_mean="abs_mean" in needs,
            progress=progress,
        )
        for name, s in inputs.items():
            stats[name].inputs = s
    if "fisher" in needs:
        for name, f in collect_fisher(model, modules, windows, progress=progress).items():
            stats[name].fisher_in = f
    return stats
