"""Training-time regularizers as ``TrainingHook`` objects: TRP and Maestro's.

- ``TRPHook`` (Trained Rank Pruning, Xu et al.): every ``period`` steps each targeted
  dense weight is replaced by its truncated SVD at the smallest rank keeping ``energy``
  of ``sum s_i^2`` (optionally capped by a budget rank); at the steps in between
  truncations' period, the nuclear-norm sub-gradient ``lambda U_k V_k^T`` is added to
  the weight's gradient. At the end the weights are low rank by construction.
- ``GroupLasso`` (Maestro): the hierarchical group lasso penalty over every
  ``MaestroLinear``, ``coef * sum_i ( sqrt(sum_{j>=i} ||u_j||^2) + sqrt(sum_{j>=i} ||v_j||^2) )``,
  which pushes importance towards the leading components.
- ``ProgressiveShrinking`` (Maestro): drops the tail components whose importance fell
  below a threshold; the layers really shrink (``MaestroLinear.shrink_``).

Shrinking and the optimizer: the shrunk layer keeps its ``nn.Parameter`` objects and
only their data gets smaller, so the optimizer's parameter groups stay valid; the hook
slices the optimizer's per-parameter state (Adam's moments) the same way
(``shrink_optimizer_state``). It therefore needs the optimizer (``optimizer=`` or
``bind(optimizer)``) when the optimizer keeps state; the ``maestro`` training method
binds it. A resumed run rebuilds the layers at their initial rank; loading the model's
state dict resizes them to the checkpoint's (``MaestroLinear._load_from_state_dict``) and
the optimizer's saved state already has the shrunk shapes.

Defaults are the authors' where they carry over: TRP's nuclear weight ``3e-4`` and
period 5 (their CIFAR script), Maestro's importance threshold ``1e-5``. TRP's energy
default here is 0.99 (the authors' CIFAR training used 0.9 on convolutions, an
aggressive cut for a language model). The group lasso coefficient defaults to ``1e-5``,
not the authors' ``gp_lambda = 5e-3`` (CNNs, SGD): summed over every component of every
layer of a language model, 5e-3 outweighs the LM loss (see ``rankcut.train.lowrank_methods``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..decompose.cur import energy_rank
from ..layers.linear import dense_weight, is_dense_linear
from ..layers.trainable import MaestroLinear
from . import TrainingHook, register_hook

logger = logging.getLogger(__name__)


# -- TRP ------------------------------------------------------------------------------------
def _gram_basis(weight: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(s, basis, wide)``: all singular values of ``weight`` (descending) and the
    singular vectors of its smaller side (left when ``wide``, i.e. ``out < in``; right
    otherwise), from the eigendecomposition of the smaller Gram matrix in float64.

    Every TRP step needs the whole spectrum (the energy rule) but only the smaller
    side's vectors. On one CPU thread a truncation this way (float64 Gram, eigh,
    projection) took 418 / 370 / 218 ms for 1536 x 576 / 576 x 1536 / 576 x 576 (SmolLM2's
    shapes) against 349 / 466 / 179 ms for a float32 SVD alone: about the same time, with
    the spectrum in float64. A model with many large matrices pays this twice per
    ``period`` (truncation and sub-gradient): raise ``period`` for those.
    """
    a = weight.detach().to(torch.float64)
    wide = a.shape[0] < a.shape[1]
    gram = a @ a.T if wide else a.T @ a
    evals, evecs = torch.linalg.eigh(gram)
    s = evals.flip(0).clamp_min(0.0).sqrt()
    return s, evecs.flip(1), wide


def truncation(weight: Tensor, energy: float, max_rank: int | None = None):
    """The TRP truncation of ``weight`` ``(out, in)``: ``(k, W_k, s)`` with ``k`` the
    smallest rank keeping ``energy`` of ``sum s_i^2`` (at most ``max_rank``), ``W_k``
    its best rank-``k`` approximation (float64) and ``s`` all singular values.

    ``W_k`` is ``W`` projected onto its top ``k`` right (or, for a wide matrix, left)
    singular vectors, so it has rank ``k`` exactly.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> truncation(w, energy=0.9)[0]  # 9 + 4 = 13 of 14 > 0.9
        2
    """
    s, basis, wide = _gram_basis(weight)
    k = energy_rank(s, energy) if energy < 1.0 else s.numel()
    if max_rank is not None:
        k = max(1, min(k, int(max_rank)))
    a = weight.detach().to(torch.float64)
    top = basis[:, :k]
    low = top @ (top.T @ a) if wide else (a @ top) @ top.T
    return k, low, s


def nuclear_subgradient(weight: Tensor, rank: int) -> Tensor:
    """``U_k V_k^T`` of ``weight``'s top ``rank`` singular triplets (float64): the
    sub-gradient of the nuclear norm of its rank-``rank`` truncation.

    Example:
        >>> g = nuclear_subgradient(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 2)
        >>> g.diagonal().tolist()
        [1.0, 1.0, 0.0]
    """
    s, basis, wide = _gram_basis(weight)
    k = max(1, min(int(rank), s.numel()))
    a = weight.detach().to(torch.float64)
    top = basis[:, :k]
    inverse = 1.0 / s[:k].clamp_min(torch.finfo(torch.float64).tiny)
    inverse = torch.where(s[:k] > 0, inverse, torch.zeros_like(inverse))
    # tall: U_k = W V_k / s_k; wide: V_k^T = U_k^T W / s_k
    return (top * inverse) @ (top.T @ a) if wide else ((a @ top) * inverse) @ top.T


def _grad_view(module: nn.Module) -> Tensor | None:
    """The weight's gradient in the ``(out, in)`` convention (a view; ``None`` if absent)."""
    grad = module.weight.grad
    if grad is None:
        return None
    return grad if isinstance(module, nn.Linear) else grad.T


@register_hook("trp")
class TRPHook(TrainingHook):
    """Trained Rank Pruning on the dense linears ``names``.

    Args:
        names: the targeted linears (``nn.Linear`` or HF ``Conv1D``), by qualified name.
        energy: share of ``sum s_i^2`` a truncation keeps (``1.0``: only ``max_ranks``).
        period: truncate after every ``period``-th optimizer step (steps ``period - 1``,
            ``2 period - 1``, ...), so that the forward of the step after sees a low-rank
            weight, as the authors truncate before the forward of every ``period``-th
            batch; the nuclear sub-gradient is added at those steps (``step % period == 0``).
        nuclear: the nuclear-norm weight ``lambda`` (0 turns the sub-gradient off).
        max_ranks: an optional cap on each weight's rank (a parameter budget).
        ranks: where the rank of each weight's last truncation is kept (a dict that the
            ``trp`` method shares with its checkpoints).

    The sub-gradient is ``U_k V_k^T`` of the current weight, ``k`` its last truncation
    rank (the energy rank before the first truncation), recomputed from the weight at
    that step so that a resumed run adds exactly what the uninterrupted run adds.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> hook = TRPHook(["0"], energy=0.5, period=1)
        >>> hook.on_step(model, 0)
        >>> hook.ranks["0"] < 8
        True
    """

    def __init__(
        self,
        names: Iterable[str],
        energy: float = 0.99,
        period: int = 5,
        nuclear: float = 3e-4,
        max_ranks: dict[str, int] | None = None,
        ranks: dict[str, int] | None = None,
    ) -> None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        if nuclear < 0:
            raise ValueError(f"nuclear must be >= 0, got {nuclear}")
        self.names = list(names)
        self.energy, self.period, self.nuclear = float(energy), int(period), float(nuclear)
        self.max_ranks = dict(max_ranks or {})
        self.ranks: dict[str, int] = {} if ranks is None else ranks

    def _modules(self, model: nn.Module):
        for name in self.names:
            module = model.get_submodule(name)
            if not is_dense_linear(module):
                raise TypeError(f"TRP targets dense linears; {name} is {type(module).__name__}")
            yield name, module

    def on_backward(self, model: nn.Module, step: int) -> None:
        if not self.nuclear or step % self.period:
            return
        with torch.no_grad():
            for name, module in self._modules(model):
                grad = _grad_view(module)
                if grad is None:
                    continue
                weight = dense_weight(module)
                rank = self.ranks.get(name)
                if rank is None:  # before the first truncation: the energy rule's rank
                    rank = truncation(weight, self.energy, self.max_ranks.get(name))[0]
                sub = nuclear_subgradient(weight, rank)
                grad.add_(sub.to(grad.dtype), alpha=self.nuclear)

    def on_step(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.period == 0:
            self.truncate(model)

    @torch.no_grad()
    def truncate(self, model: nn.Module, keep_ranks: bool = False) -> dict[str, dict[str, float]]:
        """Replace every targeted weight by its truncation now; per weight, the rank
        kept and the relative Frobenius error ``||W - W_k|| / ||W||`` it cost.

        ``keep_ranks``: a weight truncated before keeps the rank it reached then (the
        best approximation at that rank) instead of applying the energy rule again, which
        on an already truncated weight would drop a further ``1 - energy``.
        """
        report = {}
        for name, module in self._modules(model):
            weight = dense_weight(module)
            if keep_ranks and name in self.ranks:
                k, low, _ = truncation(weight, 1.0, self.ranks[name])
            else:
                k, low, _ = truncation(weight, self.energy, self.max_ranks.get(name))
            total = float(weight.detach().double().norm())
            error = float((weight.detach().double() - low.double()).norm())
            weight.copy_(low.to(weight.dtype))
            self.ranks[name] = k
            report[name] = {"rank": k, "error": error / total if total else 0.0}
        return report


# -- Maestro --------------------------------------------------------------------------------
def _maestro_layers(model: nn.Module, names: Iterable[str] | None = None):
    if names is None:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, MaestroLinear)]
    return [(n, model.get_submodule(n)) for n in names]


@register_hook("group_lasso")
class GroupLasso(TrainingHook):
    """Maestro's hierarchical group lasso, added to the loss (``penalty``).

    ``coef * sum over MaestroLinear layers of layer.group_lasso()``; ``names`` restricts
    it to some layers (default: every ``MaestroLinear`` of the model).

    Example:
        >>> from rankcut.layers import MaestroLinear
        >>> model = torch.nn.Sequential(MaestroLinear.from_linear(torch.nn.Linear(4, 4)))
        >>> bool(GroupLasso(coef=1.0).penalty(model) > 0)
        True
    """

    def __init__(self, coef: float = 1e-5, names: Iterable[str] | None = None) -> None:
        if coef < 0:
            raise ValueError(f"the group lasso coefficient must be >= 0, got {coef}")
        self.coef = float(coef)
        self.names = None if names is None else list(names)

    def penalty(self, model: nn.Module) -> Tensor | None:
        layers = _maestro_layers(model, self.names)
        if not self.coef or not layers:
            return None
        return self.coef * sum(layer.group_lasso() for _, layer in layers)


def shrink_optimizer_state(
    optimizer: torch.optim.Optimizer | None, param: nn.Parameter, old_shape: torch.Size
) -> None:
    """Slice ``optimizer``'s state for ``param`` after ``param`` shrank from ``old_shape``.

    Every state tensor of the parameter's old shape (Adam's ``exp_avg``, ``exp_avg_sq``,
    SGD's momentum, ...) keeps the leading part, as the parameter did; scalars (Adam's
    ``step``) are left alone.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2, 4))
        >>> opt = torch.optim.Adam([p])
        >>> p.sum().backward(); opt.step()
        >>> p.data = p.data[:, :3].contiguous(); p.grad = None
        >>> shrink_optimizer_state(opt, p, torch.Size([2, 4]))
        >>> opt.state[p]["exp_avg"].shape
        torch.Size([2, 3])
    """
    if optimizer is None or param not in optimizer.state:
        return
    new_shape = param.shape
    state = optimizer.state[param]
    for key, value in list(state.items()):
        if not isinstance(value, Tensor) or value.shape != old_shape:
            continue
        sliced = value
        for dim, (old, new) in enumerate(zip(old_shape, new_shape, strict=True)):
            if old != new:
                sliced = sliced.narrow(dim, 0, new)
        state[key] = sliced.contiguous()


@register_hook("maestro_shrink")
class ProgressiveShrinking(TrainingHook):
    """Maestro's progressive shrinking: drop tail components of low importance.

    After every ``every``-th optimizer step, each ``MaestroLinear`` keeps the prefix of
    components whose importance (``MaestroLinear.importance``) is at least
    ``threshold`` (at least ``min_rank``); the layer's rank really shrinks and the
    optimizer's state is sliced alike (see the module docstring). ``history`` records
    ``(step, name, old rank, new rank)``.

    Example:
        >>> from rankcut.layers import MaestroLinear
        >>> layer = MaestroLinear.from_linear(torch.nn.Linear(4, 4))
        >>> with torch.no_grad():
        ...     layer.up[:, 2:] = 0.0
        >>> model = torch.nn.Sequential(layer)
        >>> ProgressiveShrinking(threshold=1e-6, every=1).on_step(model, 0)
        >>> layer.rank
        2
    """

    def __init__(
        self,
        threshold: float = 1e-5,
        every: int = 100,
        optimizer: torch.optim.Optimizer | None = None,
        names: Iterable[str] | None = None,
        min_rank: int = 1,
    ) -> None:
        if threshold < 0:
            raise ValueError(f"the shrinking threshold must be >= 0, got {threshold}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.threshold, self.every = float(threshold), int(every)
        self.optimizer = optimizer
        self.names = None if names is None else list(names)
        self.min_rank = max(1, int(min_rank))
        self.history: list[tuple[int, str, int, int]] = []

    def bind(self, optimizer: torch.optim.Optimizer) -> ProgressiveShrinking:
        """Use ``optimizer`` (whose state is sliced when a layer shrinks)."""
        self.optimizer = optimizer
        return self

    def on_step(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.every == 0:
            self.shrink(model, step)

    @torch.no_grad()
    def shrink(self, model: nn.Module, step: int = -1) -> dict[str, int]:
        """Shrink every layer now; the new ranks of those that shrank."""
        changed = {}
        for name, layer in _maestro_layers(model, self.names):
            keep = int((layer.importance() >= self.threshold).sum())
            keep = max(min(self.min_rank, layer.rank), keep)
            if keep >= layer.rank:
                continue
            old = {p: p.shape for p in (layer.up, layer.down)}
            old_rank = layer.rank
            layer.shrink_(keep)
            for p, shape in old.items():
                shrink_optimizer_state(self.optimizer, p, shape)
            self.history.append((step, name, old_rank, keep))
            changed[name] = keep
        if changed:
            logger.info("progressive shrinking at step %d: %s", step, changed)
        return changed


__all__ = [
    "GroupLasso",
    "ProgressiveShrinking",
    "TRPHook",
    "nuclear_subgradient",
    "shrink_optimizer_state",
    "truncation",
]
