"""The whole pipeline: one calibration pass over the dense model, then every target."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..calibrate import collect_layer_stats
from ..layers import dense_weight
from .common import factorize_into
from .registry import register_pipeline


@register_pipeline("whole", summary="statistics of the dense model, one pass")
def _run_planned(model, plan, calibration, *, progress=True) -> None:
    run_whole(
        model,
        plan.todo,
        plan.ranks,
        plan.spec,
        plan.config,
        calibration,
        stats=plan.stats,
        progress=progress,
    )


def run_whole(model, todo, ranks, spec, config, calibration, stats=None, progress=True):
    """Factorize every module of ``todo`` from statistics of the dense model.

    ``stats`` (``{name: LayerStats}``) are gathered in one pass when not given.
    """
    if stats is None:
        stats = collect_layer_stats(model, todo, calibration, spec.needs, progress=progress)
    for name, module in tqdm(todo.items(), desc=spec.name, disable=not progress, leave=False):
        weight = dense_weight(module).detach().to(torch.float64)
        factorize_into(model, name, module, weight, stats[name], ranks[name], spec, config)
        stats[name] = None  # release statistics as soon as they are used
