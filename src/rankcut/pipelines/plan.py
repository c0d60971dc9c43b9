"""The plan: what ``compress`` will do, computed once for every pipeline.

targets -> statistics for the allocation -> allocation (with the speed-aware rounding,
``rank.budget.speed_round``, inside ``rank.allocate``) -> ``rank_pattern`` overrides ->
the matrices kept dense. ``compress`` (whole and sequential pipelines) and the streaming
entry point both call ``make_plan`` and hand the result to a registered pipeline, so the
ranks of one config never depend on how the model is held. The plan also decides what a
pipeline cannot do: a pipeline that does not hold the model in memory (streaming) falls
back from the default allocation to ``uniform`` and refuses the ones that need
whole-model statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibrate import StageInputs, collect_layer_stats
from ..calibrate.precision import compute_precision, resolve_compute_dtype
from ..calibrate.sensitivity import loss_table
from ..decompose import all_finite
from ..decompose.threads import map_one_thread_each, threads_for
from ..errors import RankcutError
from ..evaluate.params import param_summary
from ..layers import dense_shape, dense_weight
from ..models import find_targets, is_causal_lm, model_device, shared_weights
from ..rank import (
    ALLOCATORS,
    AllocationInput,
    AllocatorSpec,
    allocate,
    rank_for_ratio,
    saves_params,
)
from .registry import AUTO, PipelineSpec, get_pipeline

if TYPE_CHECKING:  # types only: the plan reaches a method through ``config.spec()``
    from ..methods import MethodConfig, MethodSpec

logger = logging.getLogger(__name__)


def _default_allocation(config: MethodConfig) -> str:
    """The allocation a config of this type gets when none is named."""
    return type(config).__dataclass_fields__["allocation"].default


@dataclass
class Plan:
    """Targets, ranks and statistics of one ``compress``, before any layer changes.

    Attributes:
        config: the method config with ``pipeline="auto"`` resolved (and, for a pipeline
            that cannot gather whole-model statistics, the default allocation replaced).
        spec: the registered method.
        pipeline: the registered pipeline that executes the plan.
        modules: targeted dense linears (tied weights removed), by name.
        tied: targeted names whose weight is shared (kept dense: factorizing would untie).
        shapes: ``(out, in)`` of every entry of ``modules``.
        ranks: the allocation, overrides applied (ranks of kept matrices included).
        kept: names that stay dense (tied, overridden to a rank that saves nothing, or
            dense by the allocation's choice).
        todo: the modules to factorize (``modules`` minus ``kept``), in model order.
        before: whole-model parameter counts before compression.
        stats: whole-model statistics of ``todo`` for the ``whole`` pipeline, else ``None``.
        phases: seconds spent on statistics and allocation so far.
        dense_inputs: the targets' inputs kept from the statistics pass for the
            sequential pipeline's refit (``StageInputs``; ``None`` when not kept).
    """

    config: MethodConfig
    spec: MethodSpec
    pipeline: PipelineSpec
    modules: dict[str, nn.Module]
    tied: set[str]
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, int]
    kept: list[str]
    todo: dict[str, nn.Module]
    before: dict[str, int]
    stats: dict | None = None
    phases: dict[str, float] = field(default_factory=dict)
    dense_inputs: StageInputs | None = None

    @property
    def final_ranks(self) -> dict[str, int]:
        """Ranks of the matrices that are factorized."""
        return {n: self.ranks[n] for n in self.todo}

    def param_report(self, model: nn.Module) -> dict[str, int]:
        """Parameter counts before and after, read from the factorized ``model``."""
        stored = {n: model.get_submodule(n).weight_params() for n in self.todo}
        return param_report(model, self.before, self.shapes, self.tied, self.final_ranks, stored)


def _pattern_rank(name: str, patterns: dict[str, int]) -> int | None:
    for pattern, rank in patterns.items():
        if re.search(pattern, name):
            return rank
    return None


def check_finite_weights(modules: dict[str, nn.Module]) -> None:
    """A clear error for a weight holding NaN or infinity (nothing factorizes it)."""
    for name, module in modules.items():
        if not all_finite(dense_weight(module)):
            raise RankcutError(f"non-finite values in the weight of {name}")


def _allocation_needs(allocator: AllocatorSpec, model: nn.Module, calibration) -> frozenset[str]:
    """Statistics the allocator needs: a Gram for whitened spectra, output Fisher for scores."""
    if calibration is None or not allocator.needs:
        return frozenset()
    needs = {"gram"}
    if allocator.name == "global" and is_causal_lm(model):
        needs.add("fisher_out")
    return frozenset(needs)


_STAT_FIELDS = {
    "gram": lambda st: st.inputs is not None and st.inputs.has_gram,
    "abs_mean": lambda st: st.inputs is not None and st.inputs.abs_sum is not None,
    "fisher": lambda st: st.fisher_in is not None,
    "fisher_out": lambda st: st.fisher_out is not None,
}


def resolve_config(model: nn.Module, config: MethodConfig, calibration) -> MethodConfig:
    """``config`` with ``pipeline="auto"`` replaced by the pipeline it stands for."""
    if config.pipeline != AUTO:
        return config
    from .sequential import resolve_pipeline

    modules = find_targets(model, config.targets, config.exclude)
    pipeline = resolve_pipeline(model, modules, config.pipeline, calibration)
    return dataclasses.replace(config, pipeline=pipeline)


@contextmanager
def model_precision(
    model: nn.Module,
    config: MethodConfig,
    calibration: Tensor | None,
    device: torch.device | str | None = None,
) -> Iterator[MethodConfig]:
    """``config`` with ``compute_dtype="auto"`` resolved for ``device`` (default: the
    model's), while the model's large linear products run in that precision
    (``rankcut.calibrate.precision``). Without calibration the model never runs:
    ``auto`` is then ``float32``."""
    if device is None:
        device = model_device(model)
    auto = config.compute_dtype == "auto"
    name = "float32" if auto and calibration is None else config.compute_dtype
    name = resolve_compute_dtype(name, device)
    if name != config.compute_dtype:
        config = dataclasses.replace(config, compute_dtype=name)
    with compute_precision(name):
        yield config


def statistics_needed(
    model: nn.Module, config: MethodConfig, calibration: Tensor | None
) -> frozenset[str]:
    """What the whole-model calibration pass of ``compress(model, config)`` gathers."""
    config = resolve_config(model, config, calibration)
    spec = config.spec()
    allocator = ALLOCATORS[config.allocation]
    needs = _allocation_needs(allocator, model, calibration)
    if "loss_table" in allocator.needs:
        needs |= spec.needs
    if config.pipeline == "whole":
        needs |= spec.needs
    return frozenset(needs)


def fisher_windows(
    model: nn.Module, config: MethodConfig, calibration: Tensor | None
) -> int | None:
    """How many leading calibration windows the whole-model pass back-propagates for
    the output Fisher (``None``: every window; the Gram matrices always take all).

    Every window when that pass also feeds the factorization (``whole`` pipeline) or a
    measured loss table; otherwise (its statistics only rank directions for the
    allocation) the first windows holding ``config.fisher_tokens`` tokens. The output
    Fisher is a per-channel mean of squared gradients, which needs fewer tokens than a
    Gram matrix: on SmolLM2-135M, Gram matrices from a quarter of the default windows
    moved the allocation more than the Fisher did and cost 6% perplexity at ratio 0.2
    (``benchmarks/results/compress_time.md``), so they keep every window. The backward
    was the largest cost of the default recipe (``benchmarks/results/compress_profile.md``).
    """
    if calibration is None or calibration.ndim != 2 or not config.fisher_tokens:
        return None
    config = resolve_config(model, config, calibration)
    if config.pipeline == "whole" or "loss_table" in ALLOCATORS[config.allocation].needs:
        return None
    count = -(-config.fisher_tokens // max(calibration.shape[1], 1))  # ceil
    return max(1, count) if count < calibration.shape[0] else None


def check_given_stats(stats: dict, modules: dict, needs: frozenset[str]) -> None:
    """Statistics passed to ``compress`` must hold what the plan would have gathered."""
    for name in modules:
        st = stats.get(name)
        missing = [k for k in sorted(needs) if st is None or not _STAT_FIELDS[k](st)]
        if missing:
            raise RankcutError(
                f"the given statistics lack {', '.join(missing)} for {name}; "
                "gather them with collect_statistics(model, config, calibration)"
            )


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


def check_rank_pattern(config, shapes: dict[str, tuple[int, int]]) -> None:
    """A ``RankcutError`` for a ``rank_pattern`` rank above a matched matrix's full rank.

    Such a rank used to be clipped silently, leaving the matrix dense and the budget
    missed; checked before any statistics are gathered.
    """
    for name, (m, n) in shapes.items():
        override = _pattern_rank(name, config.rank_pattern)
        if override is not None and override > min(m, n):
            raise RankcutError(
                f"rank_pattern gives {name} rank {override}, above its full rank: the "
                f"matrix is {m} x {n}, so at most rank {min(m, n)}"
            )


def apply_rank_overrides(config, ranks, shapes, tied) -> list[str]:
    """Apply ``rank_pattern`` to ``ranks`` in place; return the names kept dense."""
    check_rank_pattern(config, shapes)
    for name in ranks:
        override = _pattern_rank(name, config.rank_pattern)
        if override is not None:
            ranks[name] = override
    return sorted(tied | {n for n, r in ranks.items() if not saves_params(*shapes[n], r)})


def _default_target_kinds(model: nn.Module) -> list[str]:
    """Last name parts of the linears targeted by default (what a user can target)."""
    try:
        return sorted({name.rsplit(".", 1)[-1] for name in find_targets(model)})
    except RankcutError:  # a model with no default targets: nothing to suggest
        return []


def check_saves_something(config, tied: set[str], kept: list[str], shapes, model=None) -> None:
    """A ``RankcutError`` when every target stays dense: the run would remove nothing.

    Tied weights (factorizing would untie them and grow the model) and matrices whose
    rank saves no parameters are kept dense; when that is all of them, compressing
    would write a copy of the model and report 0 % removed.
    """
    if any(name not in kept for name in shapes):
        return
    reasons = []
    if tied:
        reasons.append(f"tied weights stay dense (factorizing would untie them): {sorted(tied)}")
    dense = sorted(n for n in kept if n not in tied)
    if dense:
        reasons.append(f"at their ranks these save no parameters: {dense}")
    kinds = _default_target_kinds(model) if model is not None else []
    hint = f"the model's other linears: {', '.join(kinds)}" if kinds else "other linears"
    raise RankcutError(
        f"targets {config.targets} can save no parameters: {'; '.join(reasons)}; target {hint}"
    )


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


def whitened_spectrum(weight: Tensor, fisher_out: Tensor | None = None):
    """Singular values of ``weight`` (descending) and, given the output Fisher, the
    loss-weighted score of each singular direction, ``s_i^2 u_i^T diag(F_out) u_i``
    (``None`` without it).

    Without ``fisher_out`` the singular values come from ``svdvals`` (other allocators
    read the small ones: elbows, low-rank tests). With it, from the eigendecomposition
    of the smaller of ``W^T W`` and ``W W^T`` in float64 (one ``min(m, n)``-wide
    ``eigh`` instead of a full SVD with its singular vectors): the eigenvalues are
    ``s_i^2`` to an absolute ``~ min(m, n) * 1e-16 * s_max^2``, far below any score the
    allocation weighs, and when ``m > n`` the scores need no left singular vectors
    (``s_i u_i = W v_i``). Float64 is kept: the whitened weight of an ill-conditioned
    Gram spans many decades, and float32 would move the small directions' scores.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64))
        >>> s, score = whitened_spectrum(w, torch.tensor([1.0, 0.5], dtype=torch.float64))
        >>> s.tolist(), score.tolist()
        ([3.0, 2.0], [9.0, 2.0])
    """
    m, n = weight.shape
    if fisher_out is None:
        with threads_for(max(m, n), weight.device):
            return torch.linalg.svdvals(weight), None
    tall = m > n
    gram = weight.T @ weight if tall else weight @ weight.T
    with threads_for(min(m, n), weight.device):  # a small eigh: one thread (shared machines)
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    f = fisher_out.to(torch.float64)[:, None]
    if tall:  # s_i u_i = W v_i, so s_i^2 u_ji^2 = (W v_i)_j^2
        scores = ((weight @ evecs) ** 2 * f).sum(0)
    else:
        # The output error of dropping direction i is s_i^2 along u_i; weigh it by the
        # loss's (diagonal) Fisher in output space.
        scores = evals * (evecs**2 * f).sum(0)
    return evals.sqrt(), scores


def allocation_input(
    model, modules, shapes, stats, allocator, spec, config, calibration, progress
) -> AllocationInput:
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
    eps = getattr(config, "eps", 1e-6)

    def inputs_of(name: str):
        st = stats.get(name)
        inputs = st.inputs if st is not None else None
        return inputs if inputs is not None and inputs.has_gram else None

    def spectrum(name: str):
        weight = dense_weight(modules[name]).detach().to(torch.float64)
        inputs = inputs_of(name)
        if inputs is not None:
            weight = weight @ inputs.cholesky(eps, name)
        st = stats.get(name)
        return whitened_spectrum(weight, st.fisher_out if st is not None else None)

    # Many small decompositions: one per core at a time (``map_one_thread_each``), the
    # Cholesky factor of each distinct input first (modules sharing an input share it).
    distinct = {id(i): (n, i) for n in modules if (i := inputs_of(n)) is not None}
    on_cpu = all(dense_weight(m).device.type == "cpu" for m in modules.values())
    workers = None if on_cpu else 1
    map_one_thread_each(lambda ni: ni[1].cholesky(eps, ni[0]), list(distinct.values()), workers)
    names = list(modules)
    bar = tqdm(total=len(names), desc="spectra", disable=not progress, leave=False)

    def counted(name: str):
        try:
            return spectrum(name)
        finally:
            bar.update()

    with bar:
        results = map_one_thread_each(counted, names, workers)
    spectra, scores = {}, {}
    for name, (spectrum_, score) in zip(names, results, strict=True):
        spectra[name] = spectrum_
        if score is not None:
            scores[name] = score
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


def _out_of_memory_config(
    config: MethodConfig, spec: MethodSpec, pipeline: PipelineSpec, allocation_given: bool
) -> MethodConfig:
    """What a pipeline that holds one block at a time can run of ``config``, or an error."""
    if ALLOCATORS[config.allocation].needs:
        if allocation_given or config.allocation != _default_allocation(config):
            raise RankcutError(
                f"{pipeline.name} compression needs ranks before it loads the first layer; "
                f"allocation {config.allocation!r} needs whole-model spectra or losses. Use "
                "allocation 'uniform' (with rank_pattern overrides), or load the model in "
                "memory"
            )
        # The default allocation needs whole-model spectra and gradients: fall back to
        # uniform ranks (a choice the user made explicitly is refused above instead).
        logger.warning(
            "%s: allocation %r needs the whole model; using 'uniform' (load the model "
            "in memory, --in-memory, for %s allocation)",
            pipeline.name,
            config.allocation,
            config.allocation,
        )
        config = dataclasses.replace(config, allocation="uniform")
    if "fisher" in spec.needs:
        raise RankcutError(
            f"{spec.name} needs loss gradients through the whole model, which {pipeline.name} "
            "cannot take; load the model in memory or use another method"
        )
    return config


def make_plan(
    model: nn.Module,
    config: MethodConfig,
    calibration: Tensor | None = None,
    *,
    stats: dict | None = None,
    progress: bool = True,
    pipeline: str | None = None,
    allocation_given: bool = True,
) -> Plan:
    """Plan ``compress(model, config, calibration)``: targets, statistics, ranks.

    Args:
        model: the dense model, or (for a pipeline that is not ``in_memory``) its
            skeleton on the meta device.
        config: the method config.
        calibration: ``(samples, seq_len)`` token ids, or ``None``.
        stats: statistics from ``collect_statistics`` to reuse instead of gathering.
        progress: show progress bars.
        pipeline: the pipeline to plan for; default ``config.pipeline`` (``auto``
            resolved).
        allocation_given: whether ``config.allocation`` was chosen by the user; a
            pipeline that cannot gather whole-model statistics falls back from the
            default allocation only when it was not.

    Returns:
        The ``Plan``; nothing in ``model`` has changed.

    Example:
        >>> plan = make_plan(model, SvdConfig(ratio=0.5, allocation="uniform"))  # doctest: +SKIP
        >>> plan.final_ranks  # doctest: +SKIP
    """
    start = time.perf_counter()
    spec = config.spec()
    if pipeline is None:
        config = resolve_config(model, config, calibration)
        pipeline = config.pipeline
    runner = get_pipeline(pipeline)
    if not runner.in_memory:
        config = _out_of_memory_config(config, spec, runner, allocation_given)
        if calibration is None:
            raise RankcutError(f"{runner.name} compression needs calibration data")
    allocator = ALLOCATORS[config.allocation]
    before = param_summary(model)
    modules, tied, shapes = select_targets(model, config)
    # Refusals that need only the structure, before any statistics are gathered.
    check_rank_pattern(config, shapes)
    if not modules:
        check_saves_something(config, tied, sorted(tied), shapes, model)
    if runner.in_memory:
        check_finite_weights(modules)

    # One whole-model pass serves both the allocation and, for the whole pipeline, the
    # factorization; the sequential pipelines gather their own statistics per block.
    needs = statistics_needed(model, config, calibration) if runner.in_memory else frozenset()
    keep = None
    if stats is None:
        gather = runner.in_memory and modules
        grad = fisher_windows(model, config, calibration)
        # The sequential refit reads the dense model's stage inputs: the pass runs the
        # dense model over the same windows, so it keeps them (memory permitting).
        if gather and runner.name == "sequential" and config.refit and calibration is not None:
            keep = StageInputs(tokens=calibration.numel())
        stats = (
            collect_layer_stats(
                model, modules, calibration, needs, progress, grad_windows=grad, keep=keep
            )
            if gather
            else {}
        )
    else:
        check_given_stats(stats, modules, needs)
        stats = dict(stats)  # the pipeline releases entries as it goes; keep the caller's
    phases = {"statistics": time.perf_counter() - start}
    inp = allocation_input(
        model, modules, shapes, stats, allocator, spec, config, calibration, progress
    )
    ranks = allocate(config.allocation, inp) if modules else {}
    phases["allocation"] = time.perf_counter() - start - phases["statistics"]
    kept = apply_rank_overrides(config, ranks, shapes, tied)
    check_saves_something(config, tied, kept, shapes, model)
    todo = {n: m for n, m in modules.items() if n not in kept}
    # Only the whole pipeline factorizes from the whole-model statistics; free them
    # otherwise before the per-block passes.
    stats = {n: stats[n] for n in todo} if pipeline == "whole" else None
    if keep is not None and not keep.covers(todo):
        keep.drop("the statistics pass gathered no input statistics")
    if keep is not None and keep.active:
        keep.retain(todo)
        logger.info(
            "kept the dense stage inputs of the statistics pass for the refit (%.2f GiB)",
            keep.nbytes / 2**30,
        )
    return Plan(
        config, spec, runner, modules, tied, shapes, ranks, kept, todo, before, stats, phases,
        keep if keep is not None and keep.active else None,
    )  # fmt: skip
