"""The sequential pipeline: decoder block by decoder block, with a refit.

Each block's statistics come from the outputs of the already-compressed blocks before
it, and with ``refit`` each matrix is fitted to reproduce the *dense* block's outputs
from the compressed inputs. Only one block's activations are held at a time (with
``refit``: two streams, plus the dense stream's inputs to each stage of the block being
compressed, instead of a dense copy of the block). ``compress_block`` is shared with the
streaming pipeline, which loads each block from disk first.

When ``compress`` planned with a whole-model statistics pass (the ``global`` allocation),
that pass ran the dense model over the same windows and kept what the refit reads of the
dense stream (``calibrate.StageInputs``, while it fits in memory): the dense blocks are
then not run again, and only the compressed stream goes block by block.

``auto`` (the default ``MethodConfig.pipeline``) is ``sequential`` when calibration data
is given and every target lies in a decoder block, else ``whole`` (``resolve_pipeline``).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..calibrate import HookManager, InputStats, LayerStats, collect_layer_stats
from ..calibrate.sequential import (
    capture_block_calls,
    forwards_replaced,
    module_input,
    run_block,
    tensor_version,
)
from ..calibrate.stats import DEFAULT_EPS, add_gram
from ..decompose import all_finite
from ..decompose.threads import threads_for
from ..errors import RankcutError
from ..layers import dense_weight
from ..models import find_decoder_layers
from .common import factorize_into
from .registry import AUTO, register_pipeline

logger = logging.getLogger(__name__)


def _group_stages(order: list[tuple[str, Tensor]], modules) -> list[list[str]]:
    """Modules grouped by the input tensor they were called with (the very same object:
    q/k/v, gate/up), in the order of ``order``, ``(name, input)`` per call."""
    stages: list[tuple[Tensor, list[str]]] = []
    for name, x in order:
        for seen_x, stage in stages:
            if seen_x is x:
                stage.append(name)
                break
        else:
            stages.append((x, [name]))
    groups = [stage for _, stage in stages]
    missing = set(modules) - {n for s in groups for n in s}
    if missing:
        raise RankcutError(f"modules never called by their block: {sorted(missing)}")
    return groups


def _stages(block: nn.Module, modules: dict[str, nn.Module], first) -> list[list[str]]:
    """Groups of modules sharing one input, in the order the block calls them."""
    order: list[tuple[str, Tensor]] = []

    def hook_for(name):
        def hook(module, args, output):
            order.append((name, args[0]))

        return hook

    with HookManager() as hooks, torch.no_grad():
        for name, module in modules.items():
            hooks.forward(module, hook_for(name))
        run_block(block, first)
    return _group_stages(order, modules)


def _refit_target(
    rhs: Tensor, weight: Tensor, inputs: InputStats, name: str, damp: float
) -> Tensor:
    """``W_ls^T = (G' + lam I)^-1 (C W^T + lam W^T)``: the map that best reproduces the
    dense outputs from the compressed inputs, ridge-regularized towards ``W``; from
    ``rhs = C W^T = X'^T X W^T``.

    ``G' = X'^T X'`` (compressed inputs ``X'``), ``X`` the dense model's inputs,
    ``lam = damp * mean(diag G')``. Minimizes ``||X' W_ls^T - X W^T||_F^2 + lam ||W_ls -
    W||_F^2``; factorizing ``W_ls`` with whitening by ``G'`` then solves the
    rank-constrained problem (reduced-rank regression). The ridge matters: in directions
    the calibration inputs barely span, the plain least squares is free to grow without
    bound (measured on SmolLM2-135M at ratio 0.4: one ``o_proj`` refit gave outputs 36x
    the dense ones on held-out text and +51% perplexity); towards ``W`` it falls back
    to the dense weight there, and changes nothing where the data determine the fit.
    """
    chol, lam = inputs.damped_cholesky(damp, name)
    rhs.add_(weight.T.to(rhs.dtype), alpha=lam)
    # Two triangular solves, the second in place: cholesky_solve would copy the (in, in)
    # factor into LAPACK's column-major layout (0.24 GB for a 5504-wide input). float64:
    # the solves amplify errors in ``rhs`` by up to the Gram's condition number.
    with threads_for(max(rhs.shape), rhs.device):
        y = torch.linalg.solve_triangular(chol, rhs, upper=False)
        del rhs
        return torch.linalg.solve_triangular(chol.T, y, upper=True, out=y).T


#: The refit's cross products of a stage are accumulated in the same pass over the
#: compressed stream as its Gram matrix while they take at most this many bytes (float64);
#: larger ones wait until the Gram is factored and dropped, and take a second pass (a
#: block run) so that only one of the two large matrices is alive at a time.
FUSED_CROSS_BYTES = 512 * 2**20


class _Cross:
    """The refit's cross products for one stage, compressed-stream inputs ``X'`` against
    the dense model's ``X``: ``{name_j: X'^T X W_j^T}`` (``(in, out_j)``) when the stage's
    outputs are narrower than its input (``down_proj``: 5504 in, 2048 out), else
    ``{"": C = X'^T X}`` (``(in, in)``, to be multiplied by each ``W_j^T``): whichever
    holds fewer numbers.

    float64 sums of float32 products per batch, as the Gram's: ``_refit_target`` solves
    against the Gram's Cholesky factor, which amplifies errors in ``C`` by up to the
    Gram's condition number (large for transformer activations: outlier channels).
    """

    def __init__(self, stage_mods: dict[str, nn.Module], in_features: int) -> None:
        self.in_features = in_features
        self.weights = {n: dense_weight(m).detach() for n, m in stage_mods.items()}
        self.direct = sum(w.shape[0] for w in self.weights.values()) < in_features
        self.acc: dict[str, Tensor] = {}

    @property
    def nbytes(self) -> int:
        width = sum(w.shape[0] for w in self.weights.values()) if self.direct else None
        return 8 * self.in_features * (width or self.in_features)

    def add(self, xc: Tensor, xd: Tensor | dict[str, Tensor]) -> None:
        """Add one batch: ``xc`` the compressed stream's stage inputs, ``xd`` the dense's
        (or, for a direct stage, the dense products ``{name: X W^T}`` themselves)."""
        xc = xc.reshape(-1, self.in_features).float()
        if isinstance(xd, dict):
            if not self.direct:
                raise RankcutError("dense outputs given for a stage wider than its input")
            pairs = {n: xd[n].reshape(-1, self.weights[n].shape[0]).float() for n in self.weights}
        else:
            xd = xd.reshape(-1, self.in_features).float()
            pairs = (
                {n: xd @ w.float().T for n, w in self.weights.items()} if self.direct else {"": xd}
            )
        for n, b in pairs.items():
            if n not in self.acc:
                self.acc[n] = xc.new_zeros((self.in_features, b.shape[1]), dtype=torch.float64)
            add_gram(self.acc[n], xc, b)
        del pairs

    def result(self, label) -> dict[str, Tensor]:
        for n, t in self.acc.items():
            if not all_finite(t):
                raise RankcutError(f"non-finite cross product for {n or label}: overflow")
        acc, self.acc, self.weights = self.acc, {}, {}
        return acc


class BlockFacts:
    """What runs of earlier blocks showed about code that every block of a class shares,
    so that later blocks need not test it again: whether a module's output reaches the
    block's output through an addition only (``_Tail``), and whether a child returns a
    module's output as its own (``_Replay``).

    One object per compress run (blocks of one model). A fact is keyed by the block's
    class, the module's path in the block and the class of every container on that
    path (not of the module itself, which factorization replaces): blocks that share
    these run the same code around the module, whatever their weights. A contradicting
    observation turns a fact off for the blocks after it.
    """

    def __init__(self) -> None:
        self.facts: dict[tuple, object] = {}

    @staticmethod
    def key(kind: str, block: nn.Module, path: str) -> tuple:
        parts = path.split(".")
        containers = []
        node = block
        for part in parts[:-1]:
            node = getattr(node, part)
            containers.append(type(node))
        return (kind, type(block), path, tuple(containers))

    def get(self, kind: str, block: nn.Module, path: str):
        return self.facts.get(self.key(kind, block, path))

    def observe(self, kind: str, block: nn.Module, path: str, value) -> None:
        key = self.key(kind, block, path)
        if key in self.facts and self.facts[key] != value:
            logger.debug("%s of %s differs between blocks: not reused", kind, path)
            value = False
        self.facts[key] = value


class _Tail:
    """The compressed block's outputs without a run of their own, for a last stage of one
    module whose output reaches the block's output through an addition only (the last
    linear of a residual branch: Llama's ``down_proj``, GPT-2's ``c_proj``).

    The stage's pass then runs the whole block (instead of stopping at the module's
    input) and keeps, per batch, the module's input ``x`` and ``base = h - M(x)`` (the
    block's output ``h`` less the dense module's share); once the module is factorized
    the outputs are ``base + M'(x)``, which saves the block run that advancing the
    compressed stream would take. Whether the output is additive is tested, not
    assumed: on the first batch the module's output is perturbed by a random ``d``, and
    the shortcut is taken only if the block's output moves by ``d`` (to float rounding);
    otherwise (a norm after the residual, BERT's) the pass falls back to stopping at the
    input and the stream is advanced by a block run as before. The answer is kept in
    ``facts`` (``BlockFacts``): later blocks of the same class take it without the test,
    and stop at the input from the first batch when it was no.
    """

    #: Largest ``||dh - d|| / ||d||`` still counted as additive (float32 rounding of the
    #: residual sum is ~1e-7 of ``||h||``; a nonlinearity after the sum moves it by O(1)).
    TOLERANCE = 1e-3

    def __init__(self, module: nn.Module, block: nn.Module, path: str, facts: BlockFacts) -> None:
        self.module = module
        self.block, self.path, self.facts = block, path, facts
        self.known = facts.get("additive", block, path)  # None: not tested yet
        self.active = self.known is not False
        self.kept: list[tuple[Tensor, Tensor]] = []  # (x, base) per batch

    def _run(self, bc, delta=None) -> tuple[list[tuple[Tensor, int | None]], list[Tensor], Tensor]:
        xs: list[tuple[Tensor, int | None]] = []  # (input, its version at the call)
        ys: list[Tensor] = []

        def pre(mod, args):
            xs.append((args[0].detach(), tensor_version(args[0])))

        def post(mod, args, output):
            # a copy: the block may add to the module's output in place afterwards
            # (Falcon's ``mlp_output += attention_output``), which ``base`` must include
            ys.append(output.detach().clone())
            return output + delta if delta is not None else None

        with HookManager() as hooks:
            hooks.forward_pre(self.module, pre)
            hooks.forward(self.module, post)
            h = run_block(self.block, bc)
        return xs, ys, h

    def input(self, bc, first: bool, aside=contextlib.nullcontext) -> Tensor | None:
        """The module's input on batch ``bc`` (its outputs kept for ``outputs``), or
        ``None`` once the shortcut is off (the caller stops at the input instead).
        ``aside()`` is entered around the test's extra run (``_Replay.aside``: not one
        of the pass's runs)."""
        if not self.active:
            return None
        xs, ys, h = self._run(bc)
        if len(xs) == 1 and xs[0][1] != tensor_version(xs[0][0]):
            # The block changed the module's input in place after the call: what the
            # hook kept is not that input. Off for this and later blocks of the class;
            # the caller stops at the input instead (which sees it unchanged).
            self.active = False
            self.kept.clear()
            self.facts.observe("additive", self.block, self.path, False)
            return None
        x = xs[0][0] if len(xs) == 1 else None
        if first:
            self.active = x is not None and ys[0].shape == h.shape
            if self.active and self.known is None:
                with aside():
                    self.active = self._additive(bc, ys[0], h)
                self.facts.observe("additive", self.block, self.path, self.active)
            if not self.active:
                return x
        self.kept.append((x, h - ys[0]))
        return x

    def _additive(self, bc, y: Tensor, h: Tensor) -> bool:
        gen = torch.Generator(device=y.device).manual_seed(0)
        delta = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
        delta *= y.float().std().clamp_min(1e-6).to(y.dtype)
        _, _, moved = self._run(bc, delta)
        err = float(((moved - h).float() - delta.float()).norm() / delta.float().norm())
        logger.debug(
            "output additivity of %s: relative error %.2e", type(self.module).__name__, err
        )
        return err <= self.TOLERANCE

    @torch.no_grad()
    def outputs(self, layer: nn.Module) -> list[Tensor]:
        """The block's outputs with ``layer`` (the factorized module) in its place."""
        kept, self.kept = self.kept, []
        return [base + layer(x) for x, base in kept]


#: Whether a block's passes over the compressed stream replay the outputs of its
#: top-level children that an earlier pass computed on the same inputs (``_Replay``).
REPLAY = True
#: The most bytes of one stage's compressed-stream inputs kept for ``_Replay`` (the
#: inputs of a module whose output is its child's).
REPLAY_INPUT_BYTES = 1 << 30


def _clone(value):
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, value)


class _Replay:
    """Outputs of a block's top-level children, kept from one pass over the compressed
    stream and given back in later passes instead of running those children again.

    A block is run over the same batches once per stage (up to the stage's input) and
    once more to advance the stream; between runs only the stage just factorized
    changes. In eager execution a child's output depends only on the block's inputs and
    on what was called before it, so a child that completed in a pass keeps its output
    until a module inside it, or inside a child called before it, is replaced
    (``changed``): then it and every child called after it are dropped. On Llama the
    attention finished by the ``gate``/``up`` pass is replayed by the ``down`` pass and
    by the run that advances the stream, which saves one attention per such block.

    A child that returns the output of one of its modules as its own (Llama's attention
    returns ``o_proj``'s, with ``None`` beside it) is not dropped when that module alone
    is replaced: its new outputs are the new module applied to the inputs the module's
    stage pass kept (``wants_inputs``), which saves the attention run of the pass after
    ``o_proj``'s. That a child returns the very output tensor of the module is observed
    in a run of the first block of a class and then taken for the later blocks of that
    class (``BlockFacts``); it is never assumed from the module's name.

    Only children holding a matrix are kept (a norm costs less than its copy); outputs
    are copied in and out (a later in-place op must not reach them). A child called
    more than once per run turns the replay off for the block.
    """

    def __init__(
        self,
        block: nn.Module,
        prefix: str,
        enabled: bool = True,
        modules=(),
        facts: BlockFacts | None = None,
    ) -> None:
        self.block = block
        self.children = dict(block.named_children())
        self.heavy = {  # holding a matrix (a linear, GPT-2's Conv1D), not only norms
            n for n, c in self.children.items() if any(p.ndim >= 2 for p in c.parameters())
        }
        self.prefix = prefix
        # the targets inside a child (not children themselves), by path in the block
        self.inner = [
            n[len(prefix) :] for n in modules if n.startswith(prefix) and "." in n[len(prefix) :]
        ]
        self.facts = facts if facts is not None else BlockFacts()
        self.order: list[str] = []  # the children in call order, as first seen
        self.kept: dict[str, dict[int, object]] = {}
        self.pending: dict[str, dict[int, object]] = {}
        self.batches: set[int] = set()
        self.enabled = enabled and REPLAY and bool(self.heavy)
        self._aside = False

    @contextlib.contextmanager
    def aside(self):
        """Runs inside this context are not the pass's: nothing is recorded or counted."""
        self._aside, was = True, self._aside
        try:
            yield
        finally:
            self._aside = was

    def _observe(self, name: str, output, outs: dict[str, Tensor]) -> None:
        """Whether child ``name`` returned, as ``output``, a target's output (``outs``)."""
        for path in self.inner:
            if path.split(".", 1)[0] != name or path not in outs:
                continue
            y = outs[path]
            if output is y:
                fact = (None, ())
            elif (
                type(output) is tuple
                and output
                and output[0] is y
                and all(v is None or type(v) in (bool, int, float, str) for v in output[1:])
            ):  # (what stands beside it is reused for every batch and block: plain values)
                fact = (tuple, output[1:])
            else:
                fact = False
            self.facts.observe("output", self.block, path, fact)

    @contextlib.contextmanager
    def batch(self, index: int, record: bool = True):
        """Around one run of the block on batch ``index``: kept children answer from
        their outputs, the others' outputs are recorded (with ``record``)."""
        if not self.enabled:
            yield
            return
        called: list[str] = []
        outs: dict[str, Tensor] = {}  # the targets' outputs in this run

        def pre_for(name):
            def pre(module, args):
                if self._aside:
                    return
                called.append(name)
                if name not in self.order:
                    self.order.append(name)

            return pre

        def post_for(name):
            def post(module, args, output):
                if self._aside:
                    return
                if record and name in self.heavy and name not in self.kept:
                    self.pending.setdefault(name, {})[index] = _clone(output)
                self._observe(name, output, outs)

            return post

        def out_for(path):
            def post(module, args, output):
                outs[path] = output

            return post

        replayed = {
            child: lambda *a, _v=self.kept[name][index], **k: _clone(_v)
            for name, child in self.children.items()
            if name in self.kept
        }
        with forwards_replaced(replayed), HookManager() as hooks:
            for name, child in self.children.items():
                hooks.forward_pre(child, pre_for(name))
                hooks.forward(child, post_for(name))
            for path in self.inner:
                hooks.forward(self.block.get_submodule(path), out_for(path))
            yield
        if len(called) != len(set(called)):
            self.enabled = False  # a child called twice: its outputs are not one per run
            self.kept.clear()
            self.pending.clear()
        self.batches.add(index)

    def end_pass(self, stage=()) -> None:
        """A pass over every batch is over: what each child recorded in all of them is
        kept, except in the children holding a module of ``stage`` (the pass's own: a
        second pass for the stage, ``_stage_cross``, must reach them)."""
        for name, outputs in self.pending.items():
            if len(outputs) == len(self.batches) and not self._holds(name, stage):
                self.kept[name] = outputs
        self.pending = {}

    def _holds(self, child: str, names) -> bool:
        return any((n + ".").startswith(f"{self.prefix}{child}.") for n in names)

    def _returns(self, stage) -> tuple[str, str, tuple] | None:
        """``(child, path, (container, rest))`` when the stage is one module whose child
        (a kept or keepable one) returns the module's output as its own, else ``None``."""
        if not self.enabled or len(stage) != 1 or not stage[0].startswith(self.prefix):
            return None
        path = stage[0][len(self.prefix) :]
        child = path.split(".", 1)[0]
        if path not in self.inner or child not in self.heavy:
            return None
        fact = self.facts.get("output", self.block, path)
        return (child, path, fact) if fact else None

    def wants_inputs(self, stage) -> bool:
        """Whether ``changed`` can use the stage's inputs, batch by batch (``_returns``)."""
        return self._returns(stage) is not None

    @torch.no_grad()
    def changed(self, names, inputs: list[Tensor] | None = None) -> None:
        """``names`` (modules of the block) were replaced: drop the children they lie in
        and every child called after the first of them. With ``inputs`` (the replaced
        module's, batch by batch, when ``wants_inputs``) the child that returns the
        module's output keeps its outputs, the new module applied to them."""
        returns = self._returns(names) if inputs is not None else None
        hit = [i for i, child in enumerate(self.order) if self._holds(child, names)]
        # (a module in a child never called yet: every child kept so far runs before it)
        dropped = self.order[min(hit) :] if hit else []
        if returns is not None and dropped and dropped[0] == returns[0]:
            child, path, (container, rest) = returns
            layer = self.block.get_submodule(path)
            outputs = {}
            for i, x in enumerate(inputs):
                y = layer(x)
                outputs[i] = y if container is None else container((y, *rest))
            self.kept[child] = outputs
            dropped = dropped[1:]
        for child in dropped:
            self.kept.pop(child, None)

    def advance(self, block: nn.Module, comp) -> list[Tensor] | None:
        """The block's outputs on ``comp`` with the kept children replayed (``None``
        when nothing is kept: the caller's plain run costs the same)."""
        if not self.enabled or not self.kept:
            return None
        outputs = []
        for i, bc in enumerate(comp):
            with self.batch(i, record=False):
                outputs.append(run_block(block, bc))  # (run_block is no_grad)
        return outputs


def _stage_pass(
    block, stage, stage_mods, comp, needs_gram, needs_abs, replay, dense_inputs=None,
    tail=None,
):  # fmt: skip
    """One pass over the compressed stream ``comp``, each run stopped at the stage's
    shared input ``X'``: its statistics, and with ``dense_inputs`` (the dense stream's
    inputs to the stage, batch by batch) the refit's cross products in the same pass.
    With ``tail`` (a ``_Tail`` of the stage's one module) the runs go through the whole
    block while the shortcut holds, and keep what the block's outputs need. Each run
    goes through ``replay`` (a ``_Replay`` of the block), which ends its pass here.

    Returns ``({name: InputStats}`` (one object for the stage)``, _Cross or None,
    inputs)``: ``inputs`` the stage's inputs batch by batch where ``replay`` can use
    them once the stage is factorized (``_Replay.wants_inputs``, within
    ``REPLAY_INPUT_BYTES``), else ``None``.
    """
    first = stage[0]
    module = stage_mods[first]
    in_features = dense_weight(module).shape[1]
    stats = InputStats(in_features, want_gram=needs_gram, want_abs=needs_abs)
    cross = _Cross(stage_mods, in_features) if dense_inputs is not None else None
    pairs = zip(comp, dense_inputs, strict=True) if cross is not None else ((b, None) for b in comp)
    kept: list[Tensor] | None = None
    if replay.wants_inputs(stage):
        tokens = sum(b.hidden.numel() // b.hidden.shape[-1] for b in comp)
        kept = [] if 4 * tokens * in_features <= REPLAY_INPUT_BYTES else None
    for i, (bc, xd) in enumerate(pairs):
        with replay.batch(i):
            xc = None
            if tail is not None:
                xc = tail.input(bc, first=i == 0, aside=replay.aside)
            if xc is None:
                xc = module_input(lambda bc=bc: run_block(block, bc), module)
        stats.update(xc.reshape(-1, in_features))
        if cross is not None:
            cross.add(xc, xd)
        if kept is not None:
            kept.append(xc)
        del xc, xd
    replay.end_pass(stage)
    stats.check_finite(first)
    return {n: stats for n in stage}, cross, kept


def _dense_pass(
    block, modules: dict[str, nn.Module], dense, spill
) -> tuple[list[list[str]], dict, list[Tensor]]:
    """One pass of the still-dense ``block`` over the dense stream: the block's stages
    (read from the calls of its first batch, as ``_stages`` does), the input of each
    stage (its first module's) and the block's outputs, batch by batch.

    Keeping these activations replaces a dense copy of the block: each dense weight is
    needed only until its own module is factorized. Reading the stages here saves the
    extra block run that ``_stages`` takes.
    """
    calls: list[tuple[str, Tensor, int | None, Tensor | None]] = []  # name, x, version, copy
    copy = False  # set once the block was seen changing a stage input in place

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            kept = x.detach().clone() if copy and name in captured else None
            calls.append((name, x, tensor_version(x), kept))

        return hook

    stages: list[list[str]] | None = None
    captured: dict = {}
    outputs = []
    with HookManager() as hooks:
        for name, module in modules.items():
            hooks.forward_pre(module, hook_for(name))
        for bd in dense:
            while True:
                calls.clear()
                out = run_block(block, bd)
                if stages is None:
                    stages = _group_stages([(n, x) for n, x, _, _ in calls], modules)
                    captured.update({stage[0]: spill(stage[0]) for stage in stages})
                intact = all(tensor_version(x) == v for n, x, v, _ in calls if n in captured)
                if copy or intact:
                    break
                # The block changed a stage input in place after the stage read it (what
                # a reference would keep is not that input): run the batch again, copying.
                copy = True
            outputs.append(out)
            for name, x, _, kept in calls:
                if name in captured:
                    captured[name].append(kept if kept is not None else x.detach())
            calls.clear()
    if stages is None:
        raise RankcutError("the sequential pipeline got no calibration batches")
    return stages, captured, outputs


def _stage_cross(block, module, stage_mods, comp, dense_inputs, replay) -> dict[str, Tensor]:
    """The refit's cross products for one stage (``_Cross``), in a pass of their own:
    run after the Gram has been factored and dropped."""
    in_features = dense_weight(module).shape[1]
    cross = _Cross(stage_mods, in_features)
    for i, (bc, xd) in enumerate(zip(comp, dense_inputs, strict=True)):
        with replay.batch(i, record=False):
            cross.add(module_input(lambda bc=bc: run_block(block, bc), module), xd)
    return cross.result(module)


def check_sequential(model, todo) -> list[tuple[str, nn.Module]]:
    """Decoder blocks of ``model``; every target must lie inside one of them, and each
    block must be one layer (not one module run as several, ALBERT's shared layers)."""
    blocks = find_decoder_layers(model)
    if not blocks:
        raise RankcutError("the sequential pipeline found no decoder blocks in this model")
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(blocks):
        raise RankcutError(
            f"the sequential pipeline needs one module per layer: this model runs "
            f"{len(blocks)} block module(s) as {layers} layers (shared layers); use "
            "--pipeline whole"
        )
    outside = [n for n in todo if not any(n.startswith(b + ".") for b, _ in blocks)]
    if outside:
        raise RankcutError(
            f"the sequential pipeline only handles decoder-block modules: {outside[:3]}"
        )
    return blocks


class _StageWeights:
    """The matrix to factorize for each module of a stage: the dense weight, or its refit
    target while ``cross`` (from ``_stage_cross``) is given; cross products are dropped
    as soon as the targets that need them are formed, before the factorization."""

    def __init__(
        self, mods, inputs, cross: dict[str, Tensor] | None, stage: list[str], damp: float
    ) -> None:
        self.mods, self.inputs, self.cross, self.left = mods, inputs, cross, len(stage)
        self.damp = damp

    def __call__(self, name: str) -> Tensor:
        w = dense_weight(self.mods[name]).detach().to(torch.float64)
        if self.cross is None:
            return w
        self.left -= 1
        if name in self.cross:  # (no other reference: _refit_target frees it early)
            return _refit_target(self.cross.pop(name), w, self.inputs[name], name, self.damp)
        cross = self.cross[""]  # the shared C = X'^T X
        if self.left == 0:
            self.cross = None
        return _refit_target(cross @ w.T, w, self.inputs[name], name, self.damp)


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
    spill=None,
    tail_wanted=True,
    cached=None,
    replay=True,
    facts=None,
):
    """Compress the targets of one decoder block, stage by stage, in place.

    ``comp`` holds the block's inputs from the compressed prefix and ``dense`` (with
    ``refit``, else ``None``) those of the dense model; both are sequences of
    ``BlockInputs``. With ``dist`` (several processes, each holding its share of the
    windows) the statistics are summed over the ranks and the block's matrices are
    divided among them. ``release(module)``, when given, is called on each dense linear
    once its factors replace it (the streaming pipeline frees its weight). ``spill(name)``
    makes the container for the dense stream's activations at each stage input
    (default: a list in memory; ``SpilledTensors`` moves them to disk). ``tail_wanted``
    (default) lets the last stage return the compressed outputs (``_Tail``); the caller
    passes ``False`` when nothing reads them (the last block). ``cached``: the block's
    ``(stages, dense stage inputs)`` kept from the statistics pass
    (``StageInputs.take_block``), which replace the dense block's run (``dense`` is then
    read only to tell the first block, whose dense stream is ``comp`` itself).
    ``replay`` (default) keeps outputs of the block's children in memory for later passes
    (``_Replay``); the streaming pipeline, whose activations may live on disk, passes
    ``False``. ``facts`` (``BlockFacts``, one per run) carries what earlier blocks
    showed about the block's code.

    Returns ``(dense_out, comp_out)``: the dense block's outputs on ``dense`` (a list of
    hidden states, taken before anything is factorized; ``None`` without ``refit`` or
    with ``cached``) and,
    with ``tail_wanted``, the compressed block's outputs on ``comp`` where they come
    cheaper than a plain block run: from the last stage's pass (``_Tail``) or from a run
    replaying the children an earlier pass left unchanged (``_Replay``); else ``None``
    (advance the stream with a block run).
    """
    needs_gram = "gram" in spec.needs or config.refit
    needs_abs = "abs_mean" in spec.needs
    mods = {n: m for n, m in todo.items() if n.startswith(block_name + ".")}
    # The first block's dense stream is the compressed one (``run_sequential`` passes
    # the same list): its first stage's inputs are the same in both, so C = X'^T X is
    # the Gram itself and need not be accumulated.
    same_stream = dense is comp
    dense_out = None
    if cached is not None:
        stages, dense_inputs = cached
    elif not mods:
        stages = []
        if config.refit and dense is not None:  # the dense stream still crosses the block
            dense_out = list(advance(block, dense))
    elif config.refit:
        stages, dense_inputs, dense_out = _dense_pass(block, mods, dense, spill or (lambda _: []))
    else:
        stages = _stages(block, mods, comp[0])
    index = 0
    tail = None
    facts = facts if facts is not None else BlockFacts()
    replay = _Replay(block, block_name + ".", enabled=replay, modules=mods, facts=facts)
    if stages and len(stages[-1]) == 1 and tail_wanted:
        name = stages[-1][0]
        tail = _Tail(mods[name], block, name[len(block_name) + 1 :], facts)
    for position, stage in enumerate(stages):
        stage_mods = {n: mods[n] for n in stage}
        first = stage[0]
        xd = dense_inputs.pop(first) if config.refit else None
        gram_is_cross = False
        fused = None
        if xd is not None:
            probe = _Cross(stage_mods, dense_weight(stage_mods[first]).shape[1])
            if probe.nbytes <= FUSED_CROSS_BYTES:  # else: a pass of its own, further down
                gram_is_cross = same_stream and position == 0 and not probe.direct
                fused = None if gram_is_cross else xd
            del probe
        last = position == len(stages) - 1
        inputs, cross_acc, stage_inputs = _stage_pass(
            block, stage, stage_mods, comp, needs_gram, needs_abs, replay, fused,
            tail if last else None,
        )  # fmt: skip
        if dist is not None:
            dist.reduce_stats(inputs[first], None)
        cross = None
        if gram_is_cross:  # (summed over the ranks already, with the Gram)
            cross = {"": inputs[first].gram.clone()}
        elif cross_acc is not None:
            cross = cross_acc.result(stage_mods[first])
            if dist is not None:
                for t in cross.values():
                    dist.all_reduce(t)
        del cross_acc
        if needs_gram:  # keep the Cholesky factors the stage uses, drop the Gram itself
            eps = {getattr(config, "eps", DEFAULT_EPS)} if "gram" in spec.needs else set()
            damped = (config.refit_damp,) if config.refit else ()
            inputs[first].release_gram(tuple(sorted(eps)), first, keep_damped=damped)
        if config.refit and cross is None:  # too large to sit beside the Gram: its own pass
            cross = _stage_cross(block, stage_mods[first], stage_mods, comp, xd, replay)
            if dist is not None:
                for t in cross.values():
                    dist.all_reduce(t)
        if xd is not None:
            xd.clear()  # a list, or SpilledTensors (its files go too)
        del xd, fused
        weights = _StageWeights(mods, inputs, cross, stage, config.refit_damp)
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
        replay.changed(stage, stage_inputs)
        # Nothing of this stage (its Cholesky factors) stays alive into the next one.
        del weights, weight, inputs, layer_stats, stage_inputs
    comp_out = None
    if tail is not None and tail.active:
        comp_out = tail.outputs(model.get_submodule(stages[-1][0]))
    elif tail_wanted:
        comp_out = replay.advance(block, comp)
    return dense_out, comp_out


def advance(block, comp):
    """Outputs of the (compressed) ``block`` on the cached inputs, in order (lazily)."""
    return (run_block(block, b) for b in comp)


@register_pipeline("sequential", summary="block by block on the compressed prefix, refit")
def _run_planned(model, plan, calibration, *, progress=True) -> None:
    dense_inputs, plan.dense_inputs = plan.dense_inputs, None  # freed block by block
    run_sequential(
        model, plan.todo, plan.ranks, plan.spec, plan.config, calibration,
        progress=progress, dense_inputs=dense_inputs,
    )  # fmt: skip


def run_sequential(
    model, todo, ranks, spec, config, calibration, stats=None, progress=True, dense_inputs=None
):
    """Compress ``todo`` decoder block by decoder block (see the module docstring).

    ``dense_inputs`` (``StageInputs`` of the statistics pass, with ``refit``): the dense
    model's stage inputs, taken block by block instead of running the dense blocks."""
    if calibration is None:
        raise RankcutError("the sequential pipeline needs calibration data")
    blocks = check_sequential(model, todo)
    fisher = {}
    if "fisher" in spec.needs:  # gradients need the whole model: taken once, from the dense one
        fisher = collect_layer_stats(model, todo, calibration, frozenset({"fisher"}), progress)
    comp, calls = capture_block_calls(model, [b for _, b in blocks], calibration, batch_size=4)
    # The same list: the first block's dense inputs are its compressed ones (compress_block
    # reuses what that makes equal).
    dense = comp if config.refit else None
    if not config.refit:
        dense_inputs = None
    last = len(blocks) - 1
    facts = BlockFacts()
    for k, (block_name, block) in enumerate(
        tqdm(blocks, desc=f"{spec.name} (sequential)", disable=not progress)
    ):
        if k:  # (block 0's are the captured ones; its dense stream is ``comp`` itself)
            comp, dense = calls.retarget(comp, k), calls.retarget(dense, k)
        cached = None
        if dense_inputs is not None:
            names = [n for n in todo if n.startswith(block_name + ".")]
            sizes = [b.hidden.numel() // b.hidden.shape[-1] for b in comp]
            cached = dense_inputs.take_block(block_name + ".", names, sizes)
        dense_out, comp_out = compress_block(
            model, block_name, block, todo, ranks, spec, config, comp, dense, fisher,
            tail_wanted=k < last, cached=cached, facts=facts,
        )  # fmt: skip
        del cached
        if k < last:  # nothing reads the last block's outputs: no run to make them
            hidden = comp_out if comp_out is not None else advance(block, comp)
            comp = [b.with_hidden(h) for b, h in zip(comp, hidden, strict=True)]
            if dense_out is not None:
                dense = [b.with_hidden(h) for b, h in zip(dense, dense_out, strict=True)]
            elif dense_inputs is not None:
                dense = None  # (only the first block's dense stream is ``comp``)
        del dense_out, comp_out


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
