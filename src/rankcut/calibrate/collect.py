"""Whole-model calibration: run windows through the model, hooks gather statistics.

Modules that read the same input tensor (q/k/v projections, gate/up projections) are
detected at run time by tensor identity and share one statistic.

When a method needs both input statistics (``gram``, ``abs_mean``) and gradients
(``fisher``, ``fisher_out``), one forward+backward over the windows gathers all of them:
the input hooks run in the forward, the gradient hooks in the backward.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import RankcutError
from ..layers import dense_shape
from ..models.adapter import adapter_for
from ..models.kind import is_causal_lm
from ..models.structure import model_device
from .activations import StageInputs
from .hooks import HookManager
from .lm_loss import IGNORE_INDEX, next_token_loss_grad, shifted_targets
from .sequential import StopForward
from .stats import InputStats, LayerStats

logger = logging.getLogger(__name__)

#: Tokens per batch of the whole-model passes (bounded activation memory), and the most
#: windows in one batch.
FISHER_BATCH_TOKENS = 2048
FISHER_MAX_BATCH = 8


def _forward(model: nn.Module, ids: Tensor, **kwargs):
    # the adapter names the token argument and drops what a non-HF forward does not take
    inputs = adapter_for(model).inputs(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return model(**inputs)


class _InputHooks:
    """Forward hooks that accumulate ``InputStats``, one per distinct input tensor."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        gram: bool,
        abs_mean: bool,
        keep: StageInputs | None = None,
    ) -> None:
        self.modules = modules
        self.gram, self.abs_mean = gram, abs_mean
        self.keep = keep  # also keeps the inputs themselves
        self.shared: dict[str, InputStats] = {}
        self.owner_of: dict[str, str] = {}  # module name -> module whose stats it shares
        self.seen: list[tuple[Tensor, str]] = []  # this batch's inputs (kept alive on purpose)

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            for tensor, first in self.seen:
                if tensor is x:
                    self.owner_of.setdefault(name, first)
                    if self.owner_of[name] != first:
                        raise RankcutError(f"{name} changed the input it shares across batches")
                    if self.keep is not None:
                        self.keep.record(module, name, first, x, output)
                    return
            if self.owner_of.get(name, name) != name:
                raise RankcutError(f"{name} stopped sharing its input with {self.owner_of[name]}")
            self.seen.append((x, name))
            if self.keep is not None:
                self.keep.record(module, name, name, x, output)
            if name not in self.shared:
                self.shared[name] = InputStats(
                    dense_shape(module)[1], want_gram=self.gram, want_abs=self.abs_mean
                )
            self.shared[name].update(x)

        return hook

    def attach(self, hooks: HookManager) -> None:
        for name, module in self.modules.items():
            hooks.forward(module, self._hook(name))

    def new_batch(self) -> None:
        self.seen.clear()
        if self.keep is not None:
            self.keep.end_batch()

    def result(self) -> dict[str, InputStats]:
        self.new_batch()
        result = {}
        for name in self.modules:
            key = self.owner_of.get(name, name)
            if key not in self.shared:
                raise RankcutError(f"module {name} received no input during calibration")
            result[name] = self.shared[key]
        for name, stats in self.shared.items():
            stats.check_finite(name)
        logger.debug(
            "input statistics: %d modules, %d distinct inputs", len(result), len(self.shared)
        )
        return result


@torch.no_grad()
def input_stats_from_passes(
    modules: dict[str, nn.Module],
    passes: Iterable[Callable[[], object]],
    gram: bool = True,
    abs_mean: bool = False,
    total: int | None = None,
    progress: bool = True,
    keep: StageInputs | None = None,
) -> dict[str, InputStats]:
    """Input statistics of ``modules`` while each callable in ``passes`` runs one batch.

    The callables may run a whole model or a single decoder block; only the hooks on
    ``modules`` matter. Modules that receive the very same input tensor share one
    ``InputStats`` object. ``keep`` also keeps the inputs (``StageInputs``).
    """
    inputs = _InputHooks(modules, gram, abs_mean, keep)
    with HookManager() as hooks:
        inputs.attach(hooks)
        for run in tqdm(passes, total=total, desc="calibrating", disable=not progress, leave=False):
            inputs.new_batch()
            run()
        inputs.new_batch()
    return inputs.result()


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor,
    gram: bool = True,
    abs_mean: bool = False,
    batch_size: int = 1,
    progress: bool = True,
    keep: StageInputs | None = None,
) -> dict[str, InputStats]:
    """Input statistics of each module in ``modules`` over the calibration ``windows``.

    Returns a mapping from module name to its ``InputStats``; modules that share an
    input map to the same object.
    """
    device = model_device(model)
    batches = windows.split(batch_size)
    passes = [lambda b=b: _forward(model, b.to(device)) for b in batches]
    was_training = model.training
    model.eval()
    try:
        return input_stats_from_passes(modules, passes, gram, abs_mean, len(passes), progress, keep)
    finally:
        model.train(was_training)


def _loss_is_token_mean(model: nn.Module) -> bool:
    """Whether ``model(..., labels=ids).loss`` is the mean over every valid shifted token
    of the batch: a transformers causal LM on its default loss (``loss_type``
    ``ForCausalLM``, or none, which transformers resolves to ``ForCausalLMLoss`` too).
    Only then may windows share a backward; another model's loss may weigh its samples
    differently (it gets one window at a time)."""
    transformers = sys.modules.get("transformers")  # a transformers model imported it
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return False
    custom = vars(model).get("_loss_function")  # set through the loss_function setter
    loss_type = getattr(model, "loss_type", None)
    return custom is None and loss_type in (None, "ForCausalLM") and is_causal_lm(model)


def fisher_batch_size(model: nn.Module, windows: Tensor) -> int:
    """Windows per backward of the output-Fisher pass: about ``FISHER_BATCH_TOKENS``
    tokens (at most ``FISHER_MAX_BATCH`` windows) when the loss is a token mean, else 1."""
    if windows.ndim != 2 or not _loss_is_token_mean(model):
        return 1
    return max(1, min(FISHER_MAX_BATCH, FISHER_BATCH_TOKENS // max(windows.shape[1], 1)))


def _sample_weights(labels: Tensor) -> Tensor | None:
    """Factors that turn per-token squares of ``d(B * L_batch)/dy`` into squares of each
    window's own ``dL_b/dy`` (``None`` when they are all 1).

    The batch loss is the mean over all ``N`` valid shifted labels (label ``!= -100``),
    ``L_batch = sum_b n_b L_b / N`` with ``L_b`` window ``b``'s own mean over its ``n_b``
    labels, and a window's outputs reach no other window's loss, so
    ``dL_b/dy_b = N / (B n_b) * d(B L_batch)/dy_b``. Windows of equal length with no
    ignored label (what calibration holds) have equal ``n_b``: the factor is exactly 1.
    """
    valid = (shifted_targets(labels) != IGNORE_INDEX).sum(1)
    if bool((valid == valid[0]).all()):
        return None
    if not bool((valid > 0).all()):
        raise RankcutError("a calibration window has no next-token label to take a loss on")
    ratio = valid.sum().to(torch.float64) / (len(labels) * valid.to(torch.float64))
    return ratio.pow(2)


def _saving(run: Callable[[], object]) -> tuple[object, set[int]]:
    """``run()`` and the storages of every tensor autograd saved for the backward."""
    saved: set[int] = set()

    def pack(tensor: Tensor) -> Tensor:
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        return run(), saved


def _backward(model, ids: Tensor, anchor: Tensor, weights: bool, fused: bool, inputs) -> None:
    """Forward ``ids`` with the graph and back-propagate the LM loss: into the weights
    that require grad (``weights``, one window), else to ``anchor`` at ``len(ids)`` times
    the loss (each window's gradient at the scale of its own loss; no parameter needs one).

    ``fused`` (the loss is transformers' mean next-token cross-entropy): the model runs
    without labels and its logits get the loss's closed-form gradient
    (``next_token_loss_grad``), written over the logits themselves unless the graph saved
    them, instead of the loss's log-softmax and its backward (three more logit-sized
    tensors). Otherwise the model's own loss is back-propagated.
    """
    scale = 1 if weights else len(ids)
    if fused:
        out, saved = _saving(lambda: _forward(model, ids, use_cache=False))
    else:
        out = _forward(model, ids, labels=ids, use_cache=False)
    if inputs is not None:
        inputs.new_batch()  # sharing is decided in the forward; free the inputs
    if fused:
        logits = getattr(out, "logits", None)
        if not isinstance(logits, Tensor) or not logits.requires_grad:
            raise RankcutError("Fisher statistics need a model whose logits depend on its inputs")
        values = logits.detach()
        in_place = values.is_contiguous() and values.untyped_storage().data_ptr() not in saved
        grad = next_token_loss_grad(values, ids, scale, out=values if in_place else None)
        del out, values
        root, grad_output = logits, grad
    else:
        loss = getattr(out, "loss", None)
        if loss is None:
            raise RankcutError("Fisher statistics need a model with a language-modeling loss")
        del out
        root, grad_output = loss * scale, None
    if weights:
        torch.autograd.backward(root, grad_tensors=grad_output)
    else:
        torch.autograd.grad(root, anchor, grad_outputs=grad_output)


def _gradient_pass(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor,
    *,
    gram: bool = False,
    abs_mean: bool = False,
    weights: bool = True,
    outputs: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    grad_windows: int | None = None,
    keep: StageInputs | None = None,
) -> tuple[dict[str, InputStats] | None, dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """One forward+backward over ``windows``: input statistics (forward hooks), weight
    Fisher (per window, from weight gradients) and output Fisher (backward hooks).

    With ``grad_windows`` (output Fisher only) just the first that many windows are
    back-propagated; the others run forward for the input statistics alone, without a
    graph and stopped once every module has seen its input (the head never runs)."""
    device = model_device(model)
    if weights:
        batch_size = 1  # the weight Fisher squares each window's own weight gradient
    elif batch_size is None:
        batch_size = fisher_batch_size(model, windows)
    elif batch_size > 1 and not _loss_is_token_mean(model):
        raise RankcutError(
            f"the loss of {type(model).__name__} is not known to be a mean over the batch's "
            "tokens: its output Fisher takes one window at a time (batch_size 1)"
        )
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deployed model
    for p in model.parameters():
        p.requires_grad_(False)
    if weights:
        for m in modules.values():
            m.weight.requires_grad_(True)  # a leaf that needs grad keeps the graph alive
    # Without weight gradients the graph is made to exist by a zero that requires grad,
    # added to the output of every target whose output would otherwise need none (the
    # first targets the tokens reach): ``y + 0`` equals ``y`` exactly, and the backward
    # reaches only what lies between those outputs and the loss, computing no parameter's
    # gradient at all.
    anchor = torch.zeros((), device=device, requires_grad=True)

    def zeros(dim: int) -> dict[str, Tensor]:
        return {
            n: torch.zeros(dense_shape(m)[dim], dtype=torch.float64, device=device)
            for n, m in modules.items()
        }

    fused = _loss_is_token_mean(model)  # the loss's gradient is known in closed form
    f_in = zeros(1) if weights else None
    f_out = zeros(0) if outputs else None
    inputs = _InputHooks(modules, gram, abs_mean, keep) if gram or abs_mean else None
    batch: dict = {"weights": None, "size": 1, "reached": set(), "grad": True, "seen": set()}
    if weights or grad_windows is None or inputs is None:
        grad_windows = len(windows)  # (weight Fisher, or nothing but gradients to gather)

    def out_hook(name: str):
        def accumulate(grad: Tensor) -> None:
            batch["reached"].add(name)
            # per-window sums of the token squares in float32 (as one window at a time
            # did), then across windows into the float64 total
            g = grad.detach().float().reshape(batch["size"], -1, grad.shape[-1])
            squares = g.pow(2).sum(1)
            w = batch["weights"]
            if w is None:
                f_out[name] += squares.sum(0, dtype=torch.float64)
            else:
                f_out[name] += (squares.to(torch.float64) * w[:, None].to(device)).sum(0)

        def hook(module, args, output):
            if not batch["grad"]:
                return None
            if not output.requires_grad:
                output = output + anchor
            output.register_hook(accumulate)
            return output

        return hook

    def stop_hook(name: str):
        def hook(module, args, output):  # after the module's input hook (registered later)
            batch["seen"].add(name)
            if not batch["grad"] and len(batch["seen"]) == len(modules):
                raise StopForward

        return hook

    def forward_only(ids: Tensor) -> None:
        batch.update(grad=False, seen=set())
        try:
            with torch.no_grad():
                _forward(model, ids, use_cache=False)
        except StopForward:
            pass
        missing = set(modules) - batch["seen"]
        if missing:
            raise RankcutError(f"module {sorted(missing)[0]} received no input during calibration")

    try:
        with HookManager() as hooks, torch.enable_grad():
            if inputs is not None:
                inputs.attach(hooks)
            if outputs or not weights:
                for name, module in modules.items():
                    hooks.forward(module, out_hook(name))
            for name, module in modules.items():
                hooks.forward(module, stop_hook(name))
            desc = "calibrating" if inputs is not None else "fisher"
            batches = [(b, True) for b in windows[:grad_windows].split(batch_size)]
            if grad_windows < len(windows):
                rest = windows[grad_windows:]
                batches += [(b, False) for b in rest.split(fisher_batch_size(model, rest))]
            for rows, with_grad in tqdm(batches, desc=desc, disable=not progress, leave=False):
                ids = rows.to(device)
                if not with_grad:
                    if inputs is not None:
                        inputs.new_batch()
                    forward_only(ids)
                    continue
                batch.update(size=len(ids), reached=set(), grad=True, seen=set())
                batch["weights"] = _sample_weights(ids) if len(ids) > 1 else None
                if inputs is not None:
                    inputs.new_batch()
                _backward(model, ids, anchor, weights, fused, inputs)
                for name, module in modules.items():
                    if weights:
                        grad = module.weight.grad
                        if grad is None:
                            raise RankcutError(f"no gradient reached {name}")
                        if not isinstance(module, nn.Linear):  # Conv1D stores (in, out)
                            grad = grad.T
                        f_in[name] += grad.detach().to(torch.float64).pow(2).sum(0)
                        module.weight.grad = None
                    elif name not in batch["reached"]:
                        raise RankcutError(f"no gradient reached {name}")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    for result in (f_in, f_out):
        for name, f in (result or {}).items():
            if not bool(torch.isfinite(f).all()):
                raise RankcutError(f"non-finite Fisher information for {name}")
    return (inputs.result() if inputs is not None else None), f_in, f_out


def collect_fisher(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor,
    progress: bool = True,
    weights: bool = True,
    outputs: bool = False,
    batch_size: int | None = None,
) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """Empirical Fisher information from per-sample gradients of the LM loss.

    With ``weights`` every calibration window is back-propagated on its own (squares of
    weight gradients are per sample). With only ``outputs``, no parameter gets a
    gradient and windows share a backward (``batch_size`` windows, by default about
    ``FISHER_BATCH_TOKENS`` tokens, for a transformers causal LM whose loss is the mean
    over the batch's tokens; 1 otherwise): a window's outputs reach only its own loss,
    so its output gradient is the batch's, rescaled exactly (``_sample_weights``).

    Returns:
        ``(fisher_in, fisher_out)``. ``fisher_in[name]`` (when ``weights``) is the weight
        Fisher summed over output rows, one value per *input* channel:
        ``F_j = sum_samples sum_i (dL/dW_ij)^2``. ``fisher_out[name]`` (when ``outputs``)
        is the diagonal Fisher of the module's *output*: ``sum_samples sum_tokens
        (dL_sample/dy_i)^2``.

    Raises:
        RankcutError: if the model has no language-modeling loss.

    Example:
        >>> _, f_out = collect_fisher(model, targets, windows, weights=False, outputs=True)  # doctest: +SKIP
    """
    if not weights and not outputs:
        return None, None
    if not modules:
        return ({} if weights else None), ({} if outputs else None)
    _, f_in, f_out = _gradient_pass(
        model,
        modules,
        windows,
        weights=weights,
        outputs=outputs,
        batch_size=batch_size,
        progress=progress,
    )
    return f_in, f_out


def collect_layer_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: Tensor | None,
    needs: frozenset[str],
    progress: bool = True,
    grad_windows: int | None = None,
    keep: StageInputs | None = None,
) -> dict[str, LayerStats]:
    """Gather what is ``needs``-ed (``gram``, ``abs_mean``, ``fisher``, ``fisher_out``) per module.

    Input statistics and gradients needed together come from one forward+backward pass.
    ``grad_windows``: the output Fisher (``fisher_out`` without ``fisher``) is summed over
    the first that many windows only; input statistics still take every window.
    ``keep`` (``StageInputs``) also keeps the inputs themselves, when input statistics
    are gathered (nothing is kept otherwise).
    """
    stats = {name: LayerStats() for name in modules}
    if not needs or not modules:
        return stats
    if windows is None:
        raise RankcutError(f"this method needs calibration data ({', '.join(sorted(needs))})")
    gram, abs_mean = "gram" in needs, "abs_mean" in needs
    weights, outputs = "fisher" in needs, "fisher_out" in needs
    f_in = f_out = None
    if weights or outputs:
        inputs, f_in, f_out = _gradient_pass(
            model,
            modules,
            windows,
            gram=gram,
            abs_mean=abs_mean,
            weights=weights,
            outputs=outputs,
            progress=progress,
            grad_windows=grad_windows,
            keep=keep,
        )
    elif gram or abs_mean:
        # sums over tokens: windows of equal length share a forward (bounded memory)
        batch = max(1, min(FISHER_MAX_BATCH, FISHER_BATCH_TOKENS // max(windows.shape[-1], 1)))
        inputs = collect_input_stats(
            model, modules, windows, gram, abs_mean, batch_size=batch, progress=progress, keep=keep
        )
    else:
        inputs = None
    for name in modules:
        if inputs is not None:
            stats[name].inputs = inputs[name]
        if weights or outputs:
            stats[name].fisher_in = f_in[name] if f_in else None
            stats[name].fisher_out = f_out[name] if f_out else None
    return stats
