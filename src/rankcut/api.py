"""``compress``: the one verb."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calibrate import collect_layer_stats
from .errors import RankcutError
from .evaluate.params import param_summary
from .layers import LowRankLinear, dense_shape, dense_weight
from .methods import MethodConfig, spec_for_config
from .models import find_targets, replace_module, shared_weights
from .rank import allocate, saves_params

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
            f"allocation {self.config.allocation}",
            f"factorized {len(self.ranks)} matrices, kept {len(self.kept_dense)} dense",
            f"targeted params {p['targeted_before']:,} -> {p['targeted_after']:,} "
            f"({1 - p['targeted_after'] / max(p['targeted_before'], 1):.1%} removed)",
            f"model params    {p['model_before']:,} -> {p['model_after']:,} "
            f"({1 - p['model_after'] / max(p['model_before'], 1):.1%} removed)",
            f"compression time {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


def _pattern_rank(name: str, patterns: dict[str, int]) -> int | None:
    for pattern, rank in patterns.items():
        if re.search(pattern, name):
            return rank
    return None


def _check_finite_weights(modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        if not bool(torch.isfinite(dense_weight(module)).all()):
            raise RankcutError(f"non-finite values in the weight of {name}")


def compress(
    model: nn.Module,
    config: MethodConfig,
    calibration: Tensor | None = None,
    *,
    progress: bool = True,
) -> CompressionResult:
    """Factorize the targeted linears of ``model`` in place, as ``config`` says.

    Args:
        model: a transformers model (causal LM or encoder) or any ``nn.Module`` whose
            repeated blocks hold dense linears. Stays on its device; statistics and
            SVDs run there.
        config: a method config, e.g. ``SvdLlmConfig(ratio=0.2)``.
        calibration: ``(samples, seq_len)`` token ids for methods that need data
            (``asvd``, ``svd-llm``, ``fwsvd``); ignored by ``svd``.
        progress: show progress bars.

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
        >>> result = rankcut.compress(tiny, SvdConfig(ratio=0.5))
        >>> len(result.ranks)
        14
    """
    spec = spec_for_config(config)
    start = time.perf_counter()
    before = param_summary(model)
    modules = find_targets(model, config.targets, config.exclude)
    _check_finite_weights(modules)
    shapes = {name: dense_shape(m) for name, m in modules.items()}
    ranks = allocate(config.allocation, shapes, config.ratio)
    for name in ranks:
        override = _pattern_rank(name, config.rank_pattern)
        if override is not None:
            ranks[name] = min(override, *shapes[name])
    tied = set(shared_weights(model, modules))
    if tied:
        logger.warning("tied weights stay dense (factorizing would untie them): %s", sorted(tied))
    kept = sorted(n for n, r in ranks.items() if n in tied or not saves_params(*shapes[n], r))
    todo = {n: m for n, m in modules.items() if n not in kept}
    if kept:
        logger.info("%d matrices stay dense (factorizing would not save parameters)", len(kept))

    stats = collect_layer_stats(model, todo, calibration, spec.needs, progress=progress)
    targeted_before = sum(m * n for m, n in shapes.values())
    for name, module in tqdm(todo.items(), desc=f"{spec.name}", disable=not progress, leave=False):
        weight = dense_weight(module).detach()
        with torch.no_grad():
            up, down = spec.factorize(
                weight.to(torch.float64), stats[name], ranks[name], config, name
            )
        if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
            raise RankcutError(f"{spec.name} produced non-finite factors for {name}")
        bias = module.bias.detach() if module.bias is not None else None
        layer = LowRankLinear.from_factors(up, down, bias, dtype=weight.dtype)
        replace_module(model, name, layer.to(weight.device))
        stats[name] = None  # release statistics as soon as they are used
    after = param_summary(model)
    final_ranks = {n: ranks[n] for n in todo}
    targeted_after = targeted_before - sum(
        m * n - final_ranks[name] * (m + n) for name, (m, n) in shapes.items() if name in todo
    )
    params = {
        "model_before": before["params_total"],
        "model_after": after["params_total"],
        "targeted_before": targeted_before,
        "targeted_after": targeted_after,
    }
    result = CompressionResult(
        model, config, final_ranks, kept, params, time.perf_counter() - start
    )
    model.rankcut_meta = {"method_config": config.to_dict(), "params": params}
    return result
