"""Orchestration: how statistics are gathered and layers replaced.

``auto`` (the default): ``sequential`` when calibration data is given and every target
lies in a decoder block, else ``whole`` (``resolve_pipeline``).
``whole``: one calibration pass over the dense model, then every target is factorized.
``sequential``: decoder block by decoder block; each block's statistics come from the
outputs of the already-compressed blocks before it, and with ``refit`` each matrix is
fitted to reproduce the *dense* block's outputs from the compressed inputs. Only one
block's activations (two streams with ``refit``) are held at a time.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calibrate import InputStats, LayerStats, collect_layer_stats
from .calibrate.sequential import capture_block_inputs, module_input, run_block
from .calibrate.stats import DEFAULT_EPS, add_gram
from .errors import RankcutError
from .layers import LowRankLinear, dense_weight
from .methods import MethodConfig, MethodSpec
from .models import find_decoder_layers, replace_module

logger = logging.getLogger(__name__)


Pipeline = Callable[..., None]
PIPELINES: dict[str, Pipeline] = {}


def register_pipeline(name: str):
    def wrap(fn: Pipeline) -> Pipeline:
        PIPELINES[name] = fn
        return fn

    return wrap


def factorize_into(
    model: nn.Module,
    name: str,
    module: nn.Module,
    weight: Tensor | Callable[[], Tensor] | None,
    stats: LayerStats,
    rank: int,
    spec: MethodSpec,
    config: MethodConfig,
    dist=None,
    owner: int = 0,
) -> None:
    """Factorize ``weight`` (float64 ``(out, in)``) with the method; swap in its layer
    (a LowRankLinear, or the structured layer a ``build`` method returns).

    ``weight`` may be a callable, evaluated only where it is needed: with ``dist`` (a
    ``rankcut.distributed.Dist``) only the ``owner`` rank factorizes, and the factors
    are broadcast to the others (low-rank methods only).
    """
    dtype = dense_weight(module).dtype
    device = dense_weight(module).device
    bias = module.bias.detach() if module.bias is not None else None
    if dist is None:
        if callable(weight):
            weight = weight()
        with torch.no_grad():
            layer = spec.make_layer(weight, stats, rank, config, name, bias=bias, dtype=dtype)
        if not all(bool(torch.isfinite(p).all()) for p in layer.parameters()):
            raise RankcutError(f"{spec.name} produced non-finite factors for {name}")
        replace_module(model, name, layer.to(device))
        return
    if spec.build is not None:
        raise RankcutError(
            f"distributed compression supports the low-rank methods only, not {spec.name}"
        )
    up = down = None
    if dist.rank == owner:
        if callable(weight):
            weight = weight()
        with torch.no_grad():
            up, down = spec.factorize(weight, stats, rank, config, name)
        del weight
        if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
            raise RankcutError(f"{spec.name} produced non-finite factors for {name}")
    out_f, in_f = dense_weight(module).shape
    shapes = [(out_f, rank), (rank, in_f)]
    up, down = dist.share(
        [up, down] if up is not None else None, shapes, torch.float64, device, owner
    )
    layer = LowRankLinear.from_factors(up, down, bias, dtype=dtype)
    replace_module(model, name, layer.to(device))


@register_pipeline("whole")
def run_whole(model, todo, ranks, spec, config, calibration, stats=None, progress=True):
    if stats is None:
        stats = collect_layer_stats(model, todo, calibration, spec.needs, progress=progress)
    for name, module in tqdm(todo.items(), desc=spec.name, disable=not progress, leave=False):
        weight = dense_weight(module).detach().to(torch.float64)
        factorize_into(model, name, module, weight, stats[name], ranks[name], spec, config)
        stats[name] = None  # release statistics as soon as they are used


def _stages(block: nn.Module, modules: dict[str, nn.Module], first) -> list[list[str]]:
    """Groups of modules sharing one input, in the order the block calls them."""
    order: list[tuple[str, Tensor]] = []

    def hook_for(name):
        def hook(module, args, output):
            order.append((name, args[0]))

        return hook

    from .calibrate import HookManager

    with HookManager() as hooks, torch.no_grad():
        for name, module in modules.items():
            hooks.forward(module, hook_for(name))
        run_block(block, first)
    stages: list[tuple[Tensor, list[str]]] = []
    for name, x in order:
        for seen_x, stage in stages:
            if seen_x is x:
                stage.append(name)
                break
        else:
            stages.append((x, [name]))
    stages = [stage for _, stage in stages]
    missing = set(modules) - {n for s in stages for n in s}
    if missing:
        raise RankcutError(f"modules never called by their block: {sorted(missing)}")
    return stages


def _refit_target(weight: Tensor, inputs: InputStats, cross: Tensor, name: str) -> Tensor:
    """``W_ls = W C^T G'^-1``: the map that best reproduces dense outputs from compressed inputs.

    ``G' = X'^T X'`` (compressed inputs), ``C = X'^T X`` (compressed x dense inputs).
    Minimizes ``||X' W_ls^T - X W^T||_F``; factorizing ``W_ls`` with whitening by ``G'``
    then solves the rank-constrained problem exactly (reduced-rank regression).
    """
    # The factor is cached on the statistics: a method whitening with the same eps
    # (SVD-LLM's default) reuses it instead of holding a second (in, in) matrix.
    chol = inputs.cholesky(name=name)
    rhs = cross.to(torch.float64) @ weight.T  # C W^T, (in, out)
    return torch.cholesky_solve(rhs, chol).T


def _stage_stats(block, stage, stage_mods, comp, needs_gram, needs_abs):
    """Statistics of one stage's shared input ``X'`` (compressed stream), each pass
    stopped at that input. Returns ``{name: InputStats}`` (one object for the stage)."""
    first = stage[0]
    module = stage_mods[first]
    in_features = dense_weight(module).shape[1]
    stats = InputStats(in_features, want_gram=needs_gram, want_abs=needs_abs)
    for bc in comp:
        xc = module_input(lambda bc=bc: run_block(block, bc), module)
        stats.update(xc.reshape(-1, in_features))
    stats.check_finite(first)
    return {n: stats for n in stage}


def _stage_cross(block, twin, block_name, first, module, comp, dense) -> Tensor:
    """``C = X'^T X``: the stage's compressed-stream inputs against the dense stream's.

    A second pass over the windows (after the Gram has been factored and dropped), so
    that the Gram, its Cholesky factor and ``C`` (each ``in x in`` float64) are never
    alive together.
    """
    in_features = dense_weight(module).shape[1]
    twin_module = twin.get_submodule(first[len(block_name) + 1 :])
    cross = None
    for bc, bd in zip(comp, dense, strict=True):
        xc = module_input(lambda bc=bc: run_block(block, bc), module)
        xd = module_input(lambda bd=bd: run_block(twin, bd), twin_module)
        if cross is None:
            cross = xc.new_zeros((in_features, in_features), dtype=torch.float64)
        add_gram(cross, xc.reshape(-1, in_features).float(), xd.reshape(-1, in_features).float())
    if not bool(torch.isfinite(cross).all()):
        raise RankcutError(f"non-finite cross product for {first}: the calibration overflowed")
    return cross


def check_sequential(model, todo) -> list[tuple[str, nn.Module]]:
    """Decoder blocks of ``model``; every target must lie inside one of them."""
    blocks = find_decoder_layers(model)
    if not blocks:
        raise RankcutError("the sequential pipeline found no decoder blocks in this model")
    outside = [n for n in todo if not any(n.startswith(b + ".") for b, _ in blocks)]
    if outside:
        raise RankcutError(
            f"the sequential pipeline only handles decoder-block modules: {outside[:3]}"
        )
    return blocks


class _StageWeights:
    """The matrix to factorize for each module of a stage: the dense weight, or its refit
    target while ``cross`` is given; the (in, in) cross product is dropped once the last
    target has been formed, before that module's factorization."""

    def __init__(self, mods, inputs, cross: Tensor | None, stage: list[str]) -> None:
        self.mods, self.inputs, self.cross, self.left = mods, inputs, cross, len(stage)

    def __call__(self, name: str) -> Tensor:
        w = dense_weight(self.mods[name]).detach().to(torch.float64)
        cross = self.cross
        self.left -= 1
        if self.left == 0:
            self.cross = None
        return w if cross is None else _refit_target(w, self.inputs[name], cross, name)


def compress_block(
    model,
    block_name,
    block,
    todo,
    ranks,
    spec,
    config,
    comp,
    dense,
    fisher,
    dist=None,
    release=None,
):
    """Compress the targets of one decoder block, stage by stage, in place.

    ``comp`` holds the block's inputs from the compressed prefix and ``dense`` (with
    ``refit``, else ``None``) those of the dense model; both are sequences of
    ``BlockInputs``. With ``dist`` (several processes, each holding its share of the
    windows) the statistics are summed over the ranks and the block's matrices are
    divided among them. ``release(module)``, when given, is called on each dense linear
    once its factors replace it (the streaming pipeline frees its weight). Returns the
    dense twin of the block (with ``refit``) so the
    dense stream can be advanced, else ``None``.
    """
    needs_gram = "gram" in spec.needs or config.refit
    needs_abs = "abs_mean" in spec.needs
    mods = {n: m for n, m in todo.items() if n.startswith(block_name + ".")}
    twin = copy.deepcopy(block) if config.refit else None
    if not mods:
        return twin
    index = 0
    for stage in _stages(block, mods, comp[0]):
        stage_mods = {n: mods[n] for n in stage}
        inputs = _stage_stats(block, stage, stage_mods, comp, needs_gram, needs_abs)
        if dist is not None:
            dist.reduce_stats(inputs[stage[0]], None)
        if needs_gram:  # keep the Cholesky factors the stage uses, drop the Gram itself
            eps = {getattr(config, "eps", DEFAULT_EPS)} if "gram" in spec.needs else set()
            eps |= {DEFAULT_EPS} if config.refit else set()
            inputs[stage[0]].release_gram(tuple(sorted(eps)), stage[0])
        cross = None
        if twin is not None:
            first = stage[0]
            cross = _stage_cross(block, twin, block_name, first, stage_mods[first], comp, dense)
            if dist is not None:
                dist.all_reduce(cross)
        weights = _StageWeights(mods, inputs, cross, stage)
        del cross
        for n in stage:
            layer_stats = LayerStats(inputs=inputs[n])
            if n in fisher:
                layer_stats.fisher_in = fisher[n].fisher_in
            weight = functools.partial(weights, n)
            owner = dist.owner(index) if dist is not None else 0
            factorize_into(
                model, n, mods[n], weight, layer_stats, ranks[n], spec, config, dist, owner
            )
            index += 1
            if release is not None:
                release(mods[n])
        del weights, weight
    return twin


def advance(block, twin, comp, dense):
    """Outputs of ``block`` (and of its dense ``twin``) on the cached inputs, in order."""
    comp_out = (b.with_hidden(run_block(block, b)) for b in comp)
    dense_out = (b.with_hidden(run_block(twin, b)) for b in dense) if twin is not None else None
    return comp_out, dense_out


@register_pipeline("sequential")
def run_sequential(model, todo, ranks, spec, config, calibration, stats=None, progress=True):
    if calibration is None:
        raise RankcutError("the sequential pipeline needs calibration data")
    blocks = check_sequential(model, todo)
    fisher = {}
    if "fisher" in spec.needs:  # gradients need the whole model: taken once, from the dense one
        fisher = collect_layer_stats(model, todo, calibration, frozenset({"fisher"}), progress)
    comp = capture_block_inputs(model, blocks[0][1], calibration, batch_size=4)
    dense = list(comp) if config.refit else None
    for block_name, block in tqdm(blocks, desc=f"{spec.name} (sequential)", disable=not progress):
        twin = compress_block(
            model, block_name, block, todo, ranks, spec, config, comp, dense, fisher
        )
        comp_out, dense_out = advance(block, twin, comp, dense)
        comp = list(comp_out)
        if dense_out is not None:
            dense = list(dense_out)
        del twin


AUTO = "auto"


def resolve_pipeline(model: nn.Module, todo, pipeline: str, calibration) -> str:
    """The pipeline ``auto`` stands for: ``sequential`` where it can run, else ``whole``.

    Sequential needs calibration data and targets inside decoder blocks; it corrects
    each block for the errors of the compressed blocks before it and refits to the dense
    outputs, which measured better than ``whole`` at every ratio tried (see
    ``benchmarks/results/quality-recipes.md``). Other names are returned unchanged.
    """
    if pipeline != AUTO:
        return pipeline
    if calibration is None:
        return "whole"
    try:
        check_sequential(model, todo)
    except RankcutError:
        return "whole"
    return "sequential"


@register_pipeline(AUTO)
def run_auto(model, todo, ranks, spec, config, calibration, stats=None, progress=True):
    """Run the pipeline ``auto`` resolves to (``compress`` resolves it up front)."""
    name = resolve_pipeline(model, todo, AUTO, calibration)
    PIPELINES[name](model, todo, ranks, spec, config, calibration, stats=stats, progress=progress)
