"""Whole-model calibration: run windows through the model, hooks gather statistics.

Modules that read the same input tensor (q/k/v projections, gate/up projections) are
detected at run time by tensor identity and share one statistic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import RankcutError
from ..layers import dense_shape
from ..models.adapter import adapter_for
from .hooks import HookManager
from .stats import InputStats, LayerStats

logger = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, ids: Tensor, **kwargs):
    # the adapter names the token argument and drops what a non-HF forward does not take
    inputs = adapter_for(model).inputs(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return model(**inputs)


@torch.no_grad()
def input_stats_from_passes(
    modules: dict[str, nn.Module],
    passes: Iterable[Callable[[], object]],
    gram: bool = True,
    abs_mean: bool = False,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, InputStats]:
    """Input statistics of ``modules`` while each callable in ``passes`` runs one batch.

    The callables may run a whole model or a single decoder block; only the hooks on
    ``modules`` matter. Modules that receive the very same input tensor share one
    ``InputStats`` object.
    """
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

    with HookManager() as hooks:
        for name, module in modules.items():
            hooks.forward(module, make_hook(name))
        for run in tqdm(passes, total=total, desc="calibrating", disable=not progress, leave=False):
            seen.clear()
            run()
        seen.clear()
    result = {}
    for name in modules:
        key = owner_of.get(name, name)
        if key not in shared:
            raise RankcutError(f"module {name} received no input during calibration")
        result[name] = shared[key]
    for name, stats in shared.items():
        stats.check_finite(name)
    logger.debug("input statistics: %d modules, %d distinct inputs", len(result), len(shared))
    return result


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
    batches = windows.split(batch_size)
    passes = [lambda b=b: _forward(model, b.to(device)) for b in batches]
    was_training = model.training
    model.eval()
    try:
        return input_stats_from_passes(modules, passes, gram, abs_mean, len(passes), progress)
    finally:
        model.train(was_training)


def collect_fisher(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor,
    progress: bool = True,
    weights: bool = True,
    outputs: bool = False,
) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """Empirical Fisher information from per-sample gradients of the LM loss.

    For every calibration window (one at a time, so squares are per-sample) the loss is
    back-propagated.

    Returns:
        ``(fisher_in, fisher_out)``. ``fisher_in[name]`` (when ``weights``) is the weight
        Fisher summed over output rows, one value per *input* channel:
        ``F_j = sum_samples sum_i (dL/dW_ij)^2``. ``fisher_out[name]`` (when ``outputs``)
        is the diagonal Fisher of the module's *output*: ``sum_tokens (dL/dy_i)^2``.

    Raises:
        RankcutError: if the model has no language-modeling loss.
    """
    device = _model_device(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deployed model
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)  # a leaf that needs grad keeps the graph alive
    f_in = (
        {
            n: torch.zeros(dense_shape(m)[1], dtype=torch.float64, device=device)
            for n, m in modules.items()
        }
        if weights
        else None
    )
    f_out = (
        {
            n: torch.zeros(dense_shape(m)[0], dtype=torch.float64, device=device)
            for n, m in modules.items()
        }
        if outputs
        else None
    )

    def out_hook(name):
        def accumulate(grad):
            g = grad.detach().reshape(-1, grad.shape[-1]).float()
            f_out[name] += g.pow(2).sum(0).to(torch.float64)

        def hook(module, args, output):
            output.register_hook(accumulate)

        return hook

    try:
        with HookManager() as hooks:
            if outputs:
                for name, module in modules.items():
                    hooks.forward(module, out_hook(name))
            for row in tqdm(windows.split(1), desc="fisher", disable=not progress, leave=False):
                ids = row.to(device)
                out = _forward(model, ids, labels=ids)
                if getattr(out, "loss", None) is None:
                    raise RankcutError(
                        "Fisher statistics need a model with a language-modeling loss"
                    )
                out.loss.backward()
                for name, module in modules.items():
                    grad = module.weight.grad
                    if grad is None:
                        raise RankcutError(f"no gradient reached {name}")
                    if weights:
                        if not isinstance(module, nn.Linear):  # Conv1D stores (in, out)
                            grad = grad.T
                        f_in[name] += grad.detach().to(torch.float64).pow(2).sum(0)
                    module.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    for result in (f_in, f_out):
        for name, f in (result or {}).items():
            if not bool(torch.isfinite(f).all()):
                raise RankcutError(f"non-finite Fisher information for {name}")
    return f_in, f_out


def collect_layer_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor | None,
    needs: frozenset[str],
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Gather what is ``needs``-ed (``gram``, ``abs_mean``, ``fisher``, ``fisher_out``) per module."""
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
    if "fisher" in needs or "fisher_out" in needs:
        f_in, f_out = collect_fisher(
            model,
            modules,
            windows,
            progress=progress,
            weights="fisher" in needs,
            outputs="fisher_out" in needs,
        )
        for name in modules:
            stats[name].fisher_in = f_in[name] if f_in else None
            stats[name].fisher_out = f_out[name] if f_out else None
    return stats
