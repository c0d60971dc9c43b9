"""``compress``: the one verb.

``compress`` plans (``pipelines.plan.make_plan``: targets, statistics, allocation,
overrides) and hands the plan to the registered pipeline its config names
(``rankcut.pipelines``). Adding a method, an allocator or a pipeline never edits this file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from torch import Tensor, nn

from .calibrate import collect_layer_stats
from .methods import MethodConfig
from .pipelines.plan import (
    fisher_windows,
    make_plan,
    model_precision,
    select_targets,
    statistics_needed,
)

__all__ = ["CompressionResult", "collect_statistics", "compress", "statistics_needed"]

logger = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """What ``compress`` did: the (same, modified in place) model and a report."""

    model: nn.Module
    config: MethodConfig
    ranks: dict[str, int]
    kept_dense: list[str]
    params: dict[str, int]
    seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        p = self.params
        lines = [
            f"method {self.config.method}, ratio {self.config.ratio}, "
            f"allocation {self.config.allocation}, products {self.config.compute_dtype}",
            f"factorized {len(self.ranks)} matrices, kept {len(self.kept_dense)} dense",
            f"targeted params {p['targeted_before']:,} -> {p['targeted_after']:,} "
            f"({1 - p['targeted_after'] / max(p['targeted_before'], 1):.1%} removed)",
            f"model params    {p['model_before']:,} -> {p['model_after']:,} "
            f"({1 - p['model_after'] / max(p['model_before'], 1):.1%} removed)",
            f"compression time {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


def collect_statistics(
    model: nn.Module, config: MethodConfig, calibration: Tensor, *, progress: bool = True
) -> dict:
    """The calibration statistics ``compress(model, config, calibration)`` would gather.

    Gather them once on the dense model and pass them as ``compress(..., stats=...)`` to
    compress copies of it at several ratios or allocations without recalibrating. They
    hold Gram matrices (``in x in`` float64 per distinct input), so they are large.

    Example:
        >>> stats = collect_statistics(dense, SvdLlmConfig(), calib)  # doctest: +SKIP
        >>> for ratio in (0.2, 0.4):  # doctest: +SKIP
        ...     compress(copy.deepcopy(dense), SvdLlmConfig(ratio=ratio), calib, stats=stats)
    """
    modules, _, _ = select_targets(model, config)
    needs = statistics_needed(model, config, calibration)
    grad = fisher_windows(model, config, calibration)
    with model_precision(model, config, calibration):
        return collect_layer_stats(model, modules, calibration, needs, progress, grad_windows=grad)


def compress(
    model: nn.Module,
    config: MethodConfig,
    calibration: Tensor | None = None,
    *,
    progress: bool = True,
    stats: dict | None = None,
) -> CompressionResult:
    """Factorize the targeted linears of ``model`` in place, as ``config`` says.

    Args:
        model: a transformers model (causal LM or encoder) or any ``nn.Module`` whose
            repeated blocks hold dense linears. Stays on its device; statistics and
            SVDs run there.
        config: a method config, e.g. ``SvdLlmConfig(ratio=0.2)``.
        calibration: ``(samples, seq_len)`` token ids for methods, allocators or
            pipelines that need data; ``svd`` with uniform ranks needs none.
        progress: show progress bars.
        stats: statistics from ``collect_statistics`` on the same dense weights and
            calibration, reused instead of gathered again (see there).

    Returns:
        A ``CompressionResult``; ``result.model`` is ``model`` with ``LowRankLinear``
        layers in place of the factorized matrices.

    Example:
        >>> import rankcut
        >>> from rankcut.methods import SvdConfig
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...     vocab_size=100))
        >>> result = rankcut.compress(tiny, SvdConfig(ratio=0.5, allocation="uniform"))
        >>> len(result.ranks)
        14
    """
    start = time.perf_counter()
    with model_precision(model, config, calibration) as config:
        plan = make_plan(model, config, calibration, stats=stats, progress=progress)
        if plan.todo:
            plan.pipeline.run(model, plan, calibration, progress=progress)
    params = plan.param_report(model)
    seconds = time.perf_counter() - start
    phases = dict(plan.phases)
    phases["factorization"] = seconds - phases["statistics"] - phases["allocation"]
    result = CompressionResult(
        model, plan.config, plan.final_ranks, plan.kept, params, seconds, extra={"phases": phases}
    )
    model.rankcut_meta = {"method_config": plan.config.to_dict(), "params": params}
    return result
