"""``compress``: the one verb."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calibrate import collect_layer_stats
from .calibrate.sensitivity import loss_table
from .decompose import all_finite
from .errors import RankcutError
from .evaluate.params import param_summary
from .layers import dense_shape, dense_weight
from .methods import MethodConfig, spec_for_config
from .models import find_targets, shared_weights
from .pipelines import PIPELINES, resolve_pipeline
from .rank import ALLOCATORS, AllocationInput, AllocatorSpec, allocate, rank_for_ratio, saves_params

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


def _stored_weight_params(layer: nn.Module) -> int:
    """Parameters a factorized layer stores for its weight (indices included, bias not)."""
    from .layers import StructuredLinear

    # LowRankLinear keeps the bias on its ``up`` factor, structured layers on themselves.
    bias = layer.bias if isinstance(layer, StructuredLinear) else layer.up.bias
    return layer.num_params() - (bias.numel() if bias is not None else 0)


def _check_finite_weights(modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        if not all_finite(dense_weight(module)):
            raise RankcutError(f"non-finite values in the weight of {name}")


def _allocation_needs(allocator: AllocatorSpec, model: nn.Module, calibration) -> frozenset[str]:
    """Statistics the allocator needs: a Gram for whitened spectra, output Fisher for scores."""
    if calibration is None or not allocator.needs:
        return frozenset()
    needs = {"gram"}
    can_generate = getattr(model, "can_generate", None)
    if allocator.name == "global" and callable(can_generate) and can_generate():
        needs.add("fisher_out")
    return frozenset(needs)


_STAT_FIELDS = {
    "gram": lambda st: st.inputs is not None and st.inputs.has_gram,
    "abs_mean": lambda st: st.inputs is not None and st.inputs.abs_sum is not None,
    "fisher": lambda st: st.fisher_in is not None,
    "fisher_out": lambda st: st.fisher_out is not None,
}


def statistics_needed(
    model: nn.Module, config: MethodConfig, calibration: Tensor | None
) -> frozenset[str]:
    """What the whole-model calibration pass of ``compress(model, config)`` gathers."""
    config = _resolved(model, config, calibration)
    spec = spec_for_config(config)
    allocator = ALLOCATORS[config.allocation]
    needs = _allocation_needs(allocator, model, calibration)
    if "loss_table" in allocator.needs:
        needs |= spec.needs
    if config.pipeline == "whole":
        needs |= spec.needs
    return frozenset(needs)


def _resolved(model: nn.Module, config: MethodConfig, calibration) -> MethodConfig:
    """``config`` with ``pipeline="auto"`` replaced by the pipeline it stands for."""
    if config.pipeline != "auto":
        return config
    modules = find_targets(model, config.targets, config.exclude)
    pipeline = resolve_pipeline(model, modules, config.pipeline, calibration)
    return dataclasses.replace(config, pipeline=pipeline)


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
    modules = find_targets(model, config.targets, config.exclude)
    tied = set(shared_weights(model, modules))
    modules = {n: m for n, m in modules.items() if n not in tied}
    needs = statistics_needed(model, config, calibration)
    return collect_layer_stats(model, modules, calibration, needs, progress)


def _check_given_stats(stats: dict, modules: dict, needs: frozenset[str]) -> None:
    for name in modules:
        st = stats.get(name)
        missing = [k for k in sorted(needs) if st is None or not _STAT_FIELDS[k](st)]
        if missing:
            raise RankcutError(
                f"the given statistics lack {', '.join(missing)} for {name}; "
                "gather them with collect_statistics(model, config, calibration)"
            )


def _allocation_input(
    model, modules, shapes, stats, allocator, spec, config, calibration, progress
):
    """Spectra (whitened when a Gram is known), loss-weighted scores and loss tables."""
    inp = AllocationInput(
        shapes=shapes,
        ratio=config.ratio,
        min_rank_fraction=config.min_rank_fraction,
        options=dict(config.allocation_options),
        rank_multiple=config.rank_multiple,
        min_speedup=config.min_speedup,
    )
    if not allocator.needs:
        return inp
    spectra, scores = {}, {}
    for name, module in tqdm(modules.items(), desc="spectra", disable=not progress, leave=False):
        weight = dense_weight(module).detach().to(torch.float64)
        st = stats.get(name)
        inputs = st.inputs if st is not None else None
        if inputs is not None and inputs.has_gram:
            weight = weight @ inputs.cholesky(getattr(config, "eps", 1e-6), name)
        if st is not None and st.fisher_out is not None:
            u, s, _ = torch.linalg.svd(weight, full_matrices=False)
            # Output error of dropping direction i is s_i^2 along u_i; weigh it by the
            # loss's (diagonal) Fisher in output space.
            scores[name] = s**2 * (u**2 * st.fisher_out[:, None]).sum(0)
            spectra[name] = s
        else:
            spectra[name] = torch.linalg.svdvals(weight)
    inp.spectra = spectra
    inp.component_scores = scores or None
    if "loss_table" in allocator.needs:
        inp.loss_table = _measure_loss_table(
            model, modules, stats, spec, config, calibration, progress
        )
    return inp


def _measure_loss_table(model, modules, stats, spec, config, calibration, progress):
    if calibration is None:
        raise RankcutError("the sensitivity allocation needs calibration data")
    opts = config.allocation_options
    candidates = [float(c) for c in opts.get("candidates", (0.2, 0.4, 0.6, 0.8))]
    samples = int(opts.get("samples", 4))
    seq = int(opts.get("seq_len", 256))
    windows = calibration[:samples, :seq]

    def truncate(name, weight, ratio):
        m, n = weight.shape
        rank = rank_for_ratio(m, n, ratio)
        if rank == 0:
            return None
        return spec.approximate(weight, stats[name], rank, config, name)

    return loss_table(model, modules, windows, truncate, candidates, progress=progress)


def select_targets(
    model: nn.Module, config: MethodConfig
) -> tuple[dict[str, nn.Module], set[str], dict[str, tuple[int, int]]]:
    """Targets (tied weights removed), the tied names, and ``(out, in)`` shapes.

    Works on a skeleton on the meta device too: only structure is read.
    """
    modules = find_targets(model, config.targets, config.exclude)
    tied = set(shared_weights(model, modules))
    if tied:
        logger.warning("tied weights stay dense (factorizing would untie them): %s", sorted(tied))
    modules = {n: m for n, m in modules.items() if n not in tied}
    return modules, tied, {name: dense_shape(m) for name, m in modules.items()}


def apply_rank_overrides(config, ranks, shapes, tied) -> list[str]:
    """Apply ``rank_pattern`` to ``ranks`` in place; return the names kept dense."""
    for name in ranks:
        override = _pattern_rank(name, config.rank_pattern)
        if override is not None:
            ranks[name] = min(override, *shapes[name])
    return sorted(tied | {n for n, r in ranks.items() if not saves_params(*shapes[n], r)})


def param_report(model, before, shapes, tied, final_ranks, stored=None) -> dict[str, int]:
    """Whole-model and targeted parameter counts before and after (``model`` is after).

    ``stored``: parameters each factorized layer really stores for its weight (structured
    layers: indices included); by default the low-rank count ``r (m + n)``.
    """
    after = param_summary(model)
    targeted_before = sum(m * n for m, n in shapes.values()) + sum(
        m * n for m, n in (dense_shape(model.get_submodule(t)) for t in tied)
    )
    targeted_after = targeted_before - sum(
        m * n - (stored[name] if stored else final_ranks[name] * (m + n))
        for name, (m, n) in shapes.items()
        if name in final_ranks
    )
    return {
        "model_before": before["params_total"],
        "model_after": after["params_total"],
        "targeted_before": targeted_before,
        "targeted_after": targeted_after,
    }


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
    config = _resolved(model, config, calibration)
    spec = spec_for_config(config)
    allocator = ALLOCATORS[config.allocation]
    start = time.perf_counter()
    before = param_summary(model)
    modules, tied, shapes = select_targets(model, config)
    _check_finite_weights(modules)

    # Statistics: one whole-model pass serves both the allocation and, for the whole
    # pipeline, the factorization; the sequential pipeline gathers its own per block.
    needs = statistics_needed(model, config, calibration)
    if stats is None:
        stats = collect_layer_stats(model, modules, calibration, needs, progress) if modules else {}
    else:
        _check_given_stats(stats, modules, needs)
        stats = dict(stats)  # the pipeline releases entries as it goes; keep the caller's
    phases = {"statistics": time.perf_counter() - start}
    inp = _allocation_input(
        model, modules, shapes, stats, allocator, spec, config, calibration, progress
    )
    ranks = allocate(config.allocation, inp) if modules else {}
    phases["allocation"] = time.perf_counter() - start - phases["statistics"]
    kept = apply_rank_overrides(config, ranks, shapes, tied)
    todo = {n: m for n, m in modules.items() if n not in kept}
    if config.pipeline != "whole":
        stats = None  # free the allocation statistics before the per-block passes
    else:
        stats = {n: stats[n] for n in todo} if todo else {}
    if todo:
        PIPELINES[config.pipeline](
            model, todo, ranks, spec, config, calibration, stats=stats, progress=progress
        )

    final_ranks = {n: ranks[n] for n in todo}
    stored = {n: _stored_weight_params(model.get_submodule(n)) for n in final_ranks}
    params = param_report(model, before, shapes, tied, final_ranks, stored)
    seconds = time.perf_counter() - start
    phases["factorization"] = seconds - phases["statistics"] - phases["allocation"]
    result = CompressionResult(
        model, config, final_ranks, kept, params, seconds, extra={"phases": phases}
    )
    model.rankcut_meta = {"method_config": config.to_dict(), "params": params}
    return result
