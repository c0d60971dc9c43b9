"""The factorized training methods: ``lrt``, ``sltrain``, ``maestro`` and ``trp``.

Each is a ``TrainMethod`` (see ``rankcut.train.methods``) registered by name; the loop
never asks which one it runs.

Sizing (``--rank R`` or ``--param-ratio P``): ``P`` is the fraction of a dense target's
``out * in`` parameters that the factorized target may store. A low-rank matrix gets
``r = floor(P out in / (out + in))``; SLTrain's sparse values and their index storage
count inside the same budget, the low-rank part taking what is left. A rank above
``min(out, in)``, a ratio outside ``(0, 1]`` or a budget that leaves a matrix no rank is
a one-line ``ConfigError``. Without either, ``lrt`` and ``sltrain`` use
``DEFAULT_PARAM_RATIO``; ``maestro`` then keeps its ordered full-rank layers and ``trp``
lets the energy threshold alone decide the ranks.

Options (``--option KEY=VALUE``), with their defaults (the authors' where they have one):

- ``lrt``: ``init`` = ``scratch`` (random factors whose product has the variance of the
  replaced weight's init) or ``svd`` (truncated SVD of the current weight, for a
  pretrained model).
- ``sltrain``: ``delta`` = 0.03 (fraction of entries in the fixed random support),
  ``alpha`` = 32 (integer; the low-rank part is scaled by ``alpha / r``). No weight decay.
  Its default learning rate from scratch is the authors' 3e-3 (``scratch_lr``).
- ``maestro``: ``lasso`` = 1e-5 (group lasso coefficient; the authors' ``gp_lambda`` is
  5e-3 for CNNs trained with SGD, but on the ``tiny`` Llama at init that makes the
  penalty 371 against an LM loss of 9, with 30x the LM's gradient on the factors, and
  on ``micro`` (60 steps) it raised validation perplexity from 248 to 274; at 1e-5 the
  penalty is about 0.7 and still presses on the tail components),
  ``shrink_threshold`` = 1e-5 (importance below which tail components are dropped),
  ``shrink_every`` = 0 (steps between shrinkings; 0: a tenth of the run),
  ``init`` = ``svd`` (as the authors, also from scratch: the SVD of the freshly
  initialised weight reproduces it) or ``random``.
- ``trp``: ``energy`` = 0.99, ``period`` = 5 (the authors' script), ``nuclear`` = 3e-4
  (the authors' default nuclear weight; 0 turns it off).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import (
    FactorizedLinear,
    LowRankLinear,
    MaestroLinear,
    SLTrainLinear,
    dense_shape,
    dense_weight,
    is_dense_linear,
    lowrank_from_scratch,
)
from ..models.structure import replace_module
from . import TrainingHook
from .base import TrainMethod, TrainSetup, register_train_method
from .regularizers import GroupLasso, ProgressiveShrinking, TRPHook

#: ``--param-ratio`` of ``lrt`` and ``sltrain`` when neither ``--rank`` nor it is given.
DEFAULT_PARAM_RATIO = 0.5


@dataclasses.dataclass(frozen=True)
class Option:
    """One ``--option KEY=VALUE`` a method takes: how to parse it, its default, its check."""

    parse: Callable[[str], Any]
    default: Any
    help: str
    check: Callable[[Any], bool] = lambda value: True
    expects: str = ""


def _choice(default: str, names: tuple[str, ...], help: str) -> Option:
    return Option(str, default, help, lambda v: v in names, f"one of {', '.join(names)}")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _parse_int(text: str) -> int:
    value = _parse_float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def _float(default: float, help: str, check, expects: str) -> Option:
    return Option(_parse_float, default, help, check, expects)


def _int(default: int, help: str, check, expects: str) -> Option:
    return Option(_parse_int, default, help, check, expects)


class LowRankTrainMethod(TrainMethod):
    """What the factorized methods share: option parsing, sizing, the layer summary."""

    #: The options this method takes (``option_keys`` is derived from it).
    options: dict[str, Option] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.option_keys = tuple(cls.options)

    # -- input checks ---------------------------------------------------------------------
    def check(self, setup: TrainSetup) -> None:
        super().check(setup)
        self.parse_options(setup)
        if setup.rank is not None and setup.param_ratio is not None:
            raise ConfigError(f"--method {self.name}: give --rank or --param-ratio, not both")
        if setup.rank is not None and (isinstance(setup.rank, bool) or setup.rank < 1):
            raise ConfigError(f"--rank must be a positive integer, got {setup.rank}")
        if setup.param_ratio is not None and not 0.0 < setup.param_ratio <= 1.0:
            raise ConfigError(f"--param-ratio must be in (0, 1], got {setup.param_ratio}")

    def parse_options(self, setup: TrainSetup) -> dict[str, Any]:
        """The options' values (defaults filled in); a bad one is a one-line ConfigError."""
        unknown = sorted(set(setup.options) - set(self.options))
        if unknown:
            TrainMethod.check(self, setup)  # the shared one-line message
        values = {}
        for key, option in self.options.items():
            if key not in setup.options:
                values[key] = option.default
                continue
            text = str(setup.options[key]).strip()
            try:
                value = option.parse(text)
            except ValueError:
                value = None
            if value is None or not option.check(value):
                raise ConfigError(
                    f"--method {self.name}: option {key}={text!r} is invalid "
                    f"(expected {option.expects})"
                )
            values[key] = value
        return values

    def default_ratio(self) -> float | None:
        """The budget when neither ``--rank`` nor ``--param-ratio`` is given."""
        return DEFAULT_PARAM_RATIO

    def budget_rank(self, setup: TrainSetup, name: str, out_features: int, in_features: int):
        """The rank a low-rank ``(out, in)`` matrix gets (``None``: no budget given)."""
        full = min(out_features, in_features)
        if setup.rank is not None:
            if setup.rank > full:
                raise ConfigError(
                    f"--rank {setup.rank} is larger than {name} ({out_features} x "
                    f"{in_features}) allows: at most {full}"
                )
            return int(setup.rank)
        ratio = setup.param_ratio if setup.param_ratio is not None else self.default_ratio()
        if ratio is None:
            return None
        rank = math.floor(ratio * out_features * in_features / (out_features + in_features))
        if rank < 1:
            raise ConfigError(
                f"--param-ratio {ratio} leaves {name} ({out_features} x {in_features}) no rank"
            )
        return min(rank, full)

    def dense_targets(self, model: nn.Module, setup: TrainSetup):
        """``(name, module, out, in)`` of every target, which must be a dense linear."""
        found = []
        for name in setup.targets:
            try:
                module = model.get_submodule(name)
            except AttributeError as err:
                raise ConfigError(f"--method {self.name}: no module named {name!r}") from err
            if not is_dense_linear(module):
                raise ConfigError(
                    f"--method {self.name}: target {name} is a {type(module).__name__}, "
                    "not a dense linear"
                )
            out_features, in_features = dense_shape(module)
            found.append((name, module, out_features, in_features))
        return found

    def optimizer(self, model: nn.Module, setup: TrainSetup) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)

    @staticmethod
    def layer_summary(model: nn.Module, names: list[str]) -> dict[str, Any]:
        """Ranks, types and the targets' parameters (stored / dense) after training."""
        ranks, types, stored, dense = {}, {}, 0, 0
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, FactorizedLinear):
                ranks[name] = module.rank
                types[name] = type(module).__name__
                stored += module.weight_params()
                dense += module.in_features * module.out_features
            else:
                out_features, in_features = dense_shape(module)
                types[name] = "dense"
                stored += out_features * in_features
                dense += out_features * in_features
        return {
            "ranks": ranks,
            "layer_types": sorted(set(types.values())),
            "targets_params": stored,
            "targets_dense_params": dense,
            "targets_param_ratio": stored / dense if dense else 1.0,
        }


def _copy_bias(layer: nn.Module, module: nn.Module) -> None:
    if module.bias is not None and layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(module.bias)


def _init_std(weight: Tensor) -> float | None:
    """The standard deviation of the weight a from-scratch layer replaces (the model's
    own initialisation), ``None`` (the ``nn.Linear`` default) when it is all zeros."""
    std = float(weight.detach().float().std()) if weight.numel() > 1 else 0.0
    return std if std > 0 and math.isfinite(std) else None


# -- LRT ----------------------------------------------------------------------------------
@register_train_method("lrt")
class LRTMethod(LowRankTrainMethod):
    """Low-rank transformer: every target is ``U V`` from the start.

    Example:
        >>> from rankcut.train.methods import train_method
        >>> train_method("lrt").option_keys
        ('init',)
    """

    summary = "every block linear trained as U V from the start (no dense weight)"
    options = {
        "init": _choice(
            "scratch",
            ("scratch", "svd"),
            "scratch: random factors at the replaced weight's init variance; svd: "
            "truncated SVD of the current weight",
        )
    }

    def prepare(self, model: nn.Module, setup: TrainSetup) -> None:
        opts = self.parse_options(setup)
        gen = torch.Generator().manual_seed(setup.seed)
        # Every size is checked before the first layer is replaced.
        plan = [
            (name, module, m, n, self.budget_rank(setup, name, m, n))
            for name, module, m, n in self.dense_targets(model, setup)
        ]
        for name, module, out_features, in_features, rank in plan:
            weight = dense_weight(module).detach()
            if opts["init"] == "svd":
                layer = LowRankLinear.from_linear(module, rank)
            else:
                layer = lowrank_from_scratch(
                    in_features,
                    out_features,
                    rank,
                    bias=module.bias is not None,
                    std=_init_std(weight),
                    generator=gen,
                    dtype=weight.dtype,
                )
                _copy_bias(layer, module)
            replace_module(model, name, layer.to(weight.device))

    def finalize(self, model: nn.Module, setup: TrainSetup) -> dict[str, Any]:
        return self.layer_summary(model, setup.targets)


# -- SLTrain ------------------------------------------------------------------------------
def sltrain_sizes(
    out_features: int,
    in_features: int,
    delta: float,
    rank: int | None = None,
    param_ratio: float | None = None,
) -> tuple[int, int]:
    """``(low rank, nnz)`` of an SLTrain ``(out, in)`` matrix.

    ``nnz = floor(delta out in)``; the low rank is ``rank`` or, under ``param_ratio``,
    the most that keeps ``r (out + in) + nnz + index storage <= param_ratio out in``
    (0 when nothing is left).

    Example:
        >>> sltrain_sizes(64, 64, 0.03, param_ratio=0.5)  # nnz 122, index (65 + 122) B / 4 -> 47
        (14, 122)
    """
    nnz = int(delta * out_features * in_features)
    if rank is not None:
        return int(rank), nnz
    budget = param_ratio * out_features * in_features
    left = budget - nnz - SLTrainLinear.index_cost(in_features, out_features, nnz)
    return max(0, math.floor(left / (out_features + in_features))), nnz


@register_train_method("sltrain")
class SLTrainMethod(LowRankTrainMethod):
    """SLTrain: ``W = (alpha / r) B A + S``, ``S`` on a fixed random support.

    Example:
        >>> from rankcut.train.methods import train_method
        >>> train_method("sltrain").option_keys
        ('delta', 'alpha')
    """

    summary = "sparse plus low rank, (alpha/r) B A + S with a fixed random support"
    #: The authors' (their LLaMA 60M-1B pretraining scripts: 3e-3, against 1e-3 for
    #: full-rank Adam): the low-rank part starts at zero and is scaled by alpha / r.
    #: On ``tiny`` (150 steps at 0.5): validation perplexity 304.5 against 329.1 at 1e-3
    #: (``benchmarks/results/train.md``).
    scratch_lr = 3e-3
    options = {
        "delta": _float(
            0.03, "fraction of entries in S's support", lambda v: 0.0 < v < 1.0, "0 < delta < 1"
        ),
        "alpha": _int(32, "scale numerator (alpha / r)", lambda v: v >= 1, "integer >= 1"),
    }

    def sizes(self, setup: TrainSetup, name: str, out_features: int, in_features: int):
        delta = self.parse_options(setup)["delta"]
        if setup.rank is not None:
            rank = self.budget_rank(setup, name, out_features, in_features)
            return sltrain_sizes(out_features, in_features, delta, rank=rank)
        ratio = setup.param_ratio if setup.param_ratio is not None else DEFAULT_PARAM_RATIO
        rank, nnz = sltrain_sizes(out_features, in_features, delta, param_ratio=ratio)
        if rank < 1:
            raise ConfigError(
                f"--method sltrain: --param-ratio {ratio} with delta={delta} leaves {name} "
                f"({out_features} x {in_features}) no low rank (lower delta or raise the ratio)"
            )
        return min(rank, min(out_features, in_features)), nnz

    def prepare(self, model: nn.Module, setup: TrainSetup) -> None:
        opts = self.parse_options(setup)
        gen = torch.Generator().manual_seed(setup.seed)
        plan = [
            (name, module, m, n, *self.sizes(setup, name, m, n))
            for name, module, m, n in self.dense_targets(model, setup)
        ]
        for name, module, out_features, in_features, rank, nnz in plan:
            weight = dense_weight(module).detach()
            layer = SLTrainLinear.from_scratch(
                in_features,
                out_features,
                rank,
                nnz,
                alpha=opts["alpha"],
                bias=module.bias is not None,
                generator=gen,
                dtype=weight.dtype,
            )
            _copy_bias(layer, module)
            replace_module(model, name, layer.to(weight.device))

    def optimizer(self, model: nn.Module, setup: TrainSetup) -> torch.optim.Optimizer:
        """AdamW without weight decay (the authors': ``--weight_decay 0``)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)

    def finalize(self, model: nn.Module, setup: TrainSetup) -> dict[str, Any]:
        summary = self.layer_summary(model, setup.targets)
        summary["nnz"] = sum(model.get_submodule(n).nnz for n in setup.targets)
        return summary


# -- Maestro ------------------------------------------------------------------------------
def maestro_cut(
    model: nn.Module, fraction: float | None = None, rank: int | None = None
) -> dict[str, int]:
    """Cut every ``MaestroLinear`` of ``model`` to a plain ``LowRankLinear``, in place.

    Each keeps its first ``rank`` components, or ``ceil(fraction min(out, in))`` (the
    authors' rounding), at most what it holds. Returns the ranks by layer name.

    Example:
        >>> model = torch.nn.Sequential(MaestroLinear.from_linear(torch.nn.Linear(8, 8)))
        >>> maestro_cut(model, fraction=0.25), type(model[0]).__name__
        ({'0': 2}, 'LowRankLinear')
    """
    if (fraction is None) == (rank is None):
        raise ConfigError("maestro_cut takes a fraction or a rank")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"the cut fraction must be in (0, 1], got {fraction}")
    ranks = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MaestroLinear)]
    for name, layer in layers:
        k = _prefix_rank(layer, fraction, rank)
        replace_module(model, name, layer.truncate(k))
        ranks[name] = k
    return ranks


def _prefix_rank(layer: MaestroLinear, fraction: float | None, rank: int | None = None) -> int:
    """``rank``, or ``ceil(fraction min(out, in))`` (the authors' rounding), within
    ``[1, what the layer holds]``: the prefix ``maestro_cut`` and ``sampler=all`` keep."""
    k = (
        rank
        if rank is not None
        else math.ceil(fraction * min(layer.in_features, layer.out_features))
    )
    return max(1, min(int(k), layer.rank))


def distillation_loss(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` against the teacher's softmax, over the positions
    that predict a next token (the last is dropped, as the LM loss does).

    Example:
        >>> t = torch.zeros(1, 3, 4)
        >>> round(float(distillation_loss(t, t)), 4)  # log 4
        1.3863
    """
    target = teacher_logits[:, :-1].detach().float().softmax(-1)
    log_p = logits[:, :-1].float().log_softmax(-1)
    return -(target * log_p).sum(-1).mean()


@register_train_method("maestro")
class MaestroMethod(LowRankTrainMethod):
    """Maestro: ordered ``U V`` layers trained with ordered dropout, distillation and a
    hierarchical group lasso, progressively shrunk; one run cuts to any rank.

    Each step's loss is the full network's LM loss plus, for one sampled (layer, rank
    prefix) pair (uniform over all pairs, as the authors' single-layer sampler; from
    ``(seed, step)`` so a resumed run draws the same), the cross-entropy of the network
    with that layer cut towards the full network's (detached) softmax. ``finalize``
    cuts every layer to ``--rank`` / ``--param-ratio`` when given, else keeps the
    ordered layers (cut them later with ``maestro_cut``).

    ``sampler=all`` (not the authors' choice) cuts every layer at once instead, to one
    fraction ``p`` of its full rank drawn uniformly per step (``ceil(p min(out, in))``,
    as ``maestro_cut`` rounds; FjORD's ordered dropout over the whole network): the
    network then trains in the state a uniform cut leaves it in. ``warmup=w`` (not the
    authors' either) trains the first ``w`` of the steps on the uncut network's loss
    alone, so ordered dropout starts from a network that has learnt something.

    Example:
        >>> from rankcut.train.methods import train_method
        >>> train_method("maestro").option_keys
        ('lasso', 'shrink_threshold', 'shrink_every', 'init', 'sampler', 'warmup')
    """

    summary = "ordered low rank (ordered dropout + group lasso), cut to any rank afterwards"
    options = {
        "lasso": _float(1e-5, "group lasso coefficient", lambda v: v >= 0, "a number >= 0"),
        "shrink_threshold": _float(
            1e-5, "importance below which tail ranks are dropped", lambda v: v >= 0, ">= 0"
        ),
        "shrink_every": _int(
            0, "steps between shrinkings (0: a tenth of the run)", lambda v: v >= 0, "integer >= 0"
        ),
        "init": _choice(
            "svd", ("svd", "random"), "svd of the current weight (as the authors) or random"
        ),
        "sampler": _choice(
            "layer",
            ("layer", "all"),
            "cut one sampled layer per step (as the authors) or all at one sampled fraction",
        ),
        "warmup": _float(
            0.0,
            "fraction of the steps trained uncut (no ordered dropout) before it starts",
            lambda v: 0 <= v < 1,
            "a number in [0, 1)",
        ),
    }

    def __init__(self) -> None:
        self._names: list[str] = []
        self._seed = 0
        self._sampler = "layer"
        self._first_cut_step = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._shrink: ProgressiveShrinking | None = None
        self._cut: dict[str, int] = {}

    def default_ratio(self) -> float | None:
        return None

    def prepare(self, model: nn.Module, setup: TrainSetup) -> None:
        opts = self.parse_options(setup)
        gen = torch.Generator().manual_seed(setup.seed)
        targets = self.dense_targets(model, setup)
        cuts = {name: self.budget_rank(setup, name, m, n) for name, _, m, n in targets}
        self._names, self._seed = [], int(setup.seed)
        self._sampler = opts["sampler"]
        self._first_cut_step = int(opts["warmup"] * setup.steps)
        self._cut = {name: cut for name, cut in cuts.items() if cut is not None}
        for name, module, out_features, in_features in targets:
            weight = dense_weight(module).detach()
            if opts["init"] == "svd":
                layer = MaestroLinear.from_linear(module)
            else:
                layer = MaestroLinear.from_scratch(
                    in_features,
                    out_features,
                    bias=module.bias is not None,
                    std=_init_std(weight),
                    generator=gen,
                    dtype=weight.dtype,
                )
                _copy_bias(layer, module)
            replace_module(model, name, layer.to(weight.device))
            self._names.append(name)

    def optimizer(self, model: nn.Module, setup: TrainSetup) -> torch.optim.Optimizer:
        self._optimizer = super().optimizer(model, setup)
        if self._shrink is not None:  # hooks() came first
            self._shrink.bind(self._optimizer)
        return self._optimizer

    def sample(self, model: nn.Module, step: int) -> tuple[str, int] | None:
        """The (layer, rank prefix) that step ``step`` trains cut (``None``: no layer)."""
        layers = [(n, model.get_submodule(n)) for n in self._names]
        total = sum(layer.rank for _, layer in layers)
        if not total:
            return None
        gen = self._generator(step)
        index = int(torch.randint(total, (1,), generator=gen))
        for name, layer in layers:
            if index < layer.rank:
                return name, index + 1
            index -= layer.rank
        raise AssertionError("unreachable")  # pragma: no cover

    def sample_all(self, model: nn.Module, step: int) -> dict[str, int]:
        """``sampler=all``: every layer's rank prefix at step ``step``, one fraction
        ``p`` in (0, 1] of each layer's full rank (at most the rank it still holds)."""
        p = 1.0 - float(torch.rand((), generator=self._generator(step)))  # (0, 1]
        layers = {name: model.get_submodule(name) for name in self._names}
        return {name: _prefix_rank(layer, p) for name, layer in layers.items() if layer.rank}

    def _generator(self, step: int) -> torch.Generator:
        """The draws of step ``step``: from ``(seed, step)``, so a resumed run repeats them."""
        return torch.Generator().manual_seed(self._seed * 1_000_003 + int(step))

    def cuts(self, model: nn.Module, step: int) -> dict[str, int]:
        """The rank prefix of each layer that step ``step`` trains cut (by sampler)."""
        if self._sampler == "all":
            return self.sample_all(model, step)
        picked = self.sample(model, step)
        return dict([picked]) if picked is not None else {}

    def loss(self, model: nn.Module, ids: Tensor, step: int) -> Tensor:
        full = model(input_ids=ids, labels=ids)
        cuts = self.cuts(model, step) if step >= self._first_cut_step else {}
        if not cuts:
            return full.loss
        layers = {name: model.get_submodule(name) for name in cuts}
        try:
            for name, rank in cuts.items():
                layers[name].active_rank = rank
            partial = model(input_ids=ids).logits
        finally:
            for layer in layers.values():
                layer.active_rank = None
        return full.loss + distillation_loss(partial, full.logits)

    def hooks(self, model: nn.Module, setup: TrainSetup) -> list[TrainingHook]:
        opts = self.parse_options(setup)
        every = opts["shrink_every"] or max(1, setup.steps // 10)
        self._shrink = ProgressiveShrinking(
            opts["shrink_threshold"], every, optimizer=self._optimizer, names=self._names
        )
        return [GroupLasso(opts["lasso"], names=self._names), self._shrink]

    def finalize(self, model: nn.Module, setup: TrainSetup) -> dict[str, Any]:
        trained = {n: model.get_submodule(n).rank for n in self._names}
        for name in self._names:
            layer = model.get_submodule(name)
            layer.active_rank = None
            if name in self._cut:
                replace_module(model, name, layer.truncate(min(self._cut[name], layer.rank)))
        summary = self.layer_summary(model, setup.targets)
        summary["trained_ranks"] = trained
        summary["cut"] = bool(self._cut)
        history = self._shrink.history if self._shrink is not None else []
        summary["shrinking"] = [
            {"step": step, "layer": name, "from": old, "to": new}
            for step, name, old, new in history
        ]
        return summary


# -- TRP ----------------------------------------------------------------------------------
@register_train_method("trp")
class TRPMethod(LowRankTrainMethod):
    """Trained Rank Pruning: dense weights kept low rank by periodic energy truncation
    and a nuclear-norm sub-gradient; ``finalize`` factorizes them.

    ``--rank`` / ``--param-ratio`` cap every truncation's rank (a parameter budget);
    without them the energy threshold alone decides. ``finalize`` truncates once more at
    the rank each weight reached in its last truncation (the best approximation at that
    rank; exact when the run ended on a truncation step) and replaces it by a
    ``LowRankLinear``, unless that would not save parameters (it then stays dense).

    Example:
        >>> from rankcut.train.methods import train_method
        >>> train_method("trp").option_keys
        ('energy', 'period', 'nuclear')
    """

    summary = (
        "dense training kept low rank (TRP: energy truncation + nuclear norm), then factorized"
    )
    options = {
        "energy": _float(
            0.99, "share of sum s^2 each truncation keeps", lambda v: 0.0 < v <= 1.0, "0 < e <= 1"
        ),
        "period": _int(5, "steps between truncations", lambda v: v >= 1, "integer >= 1"),
        "nuclear": _float(3e-4, "nuclear-norm weight", lambda v: v >= 0, "a number >= 0"),
    }

    def __init__(self) -> None:
        self._ranks: dict[str, int] = {}
        self._caps: dict[str, int] = {}
        self._hook: TRPHook | None = None

    def default_ratio(self) -> float | None:
        return None

    def prepare(self, model: nn.Module, setup: TrainSetup) -> None:
        self.parse_options(setup)
        self._caps = {}
        for name, _, out_features, in_features in self.dense_targets(model, setup):
            cap = self.budget_rank(setup, name, out_features, in_features)
            if cap is not None:
                self._caps[name] = cap

    def _make_hook(self, setup: TrainSetup) -> TRPHook:
        opts = self.parse_options(setup)
        return TRPHook(
            setup.targets,
            energy=opts["energy"],
            period=opts["period"],
            nuclear=opts["nuclear"],
            max_ranks=self._caps,
            ranks=self._ranks,
        )

    def hooks(self, model: nn.Module, setup: TrainSetup) -> list[TrainingHook]:
        self._hook = self._make_hook(setup)
        return [self._hook]

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": dict(self._ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # In place: a hook made before (or after) this call shares the dict.
        self._ranks.clear()
        self._ranks.update({str(k): int(v) for k, v in state.get("ranks", {}).items()})

    def finalize(self, model: nn.Module, setup: TrainSetup) -> dict[str, Any]:
        hook = self._hook or self._make_hook(setup)
        # At the rank each weight reached (its last truncation; the energy rule for a
        # weight never truncated), so a run ending on a truncation step loses nothing.
        truncated = hook.truncate(model, keep_ranks=True)
        kept_dense = []
        for name, info in truncated.items():
            module = model.get_submodule(name)
            out_features, in_features = dense_shape(module)
            rank = int(info["rank"])
            if rank * (out_features + in_features) < out_features * in_features:
                replace_module(model, name, LowRankLinear.from_linear(module, rank))
            else:
                kept_dense.append(name)
        summary = self.layer_summary(model, setup.targets)
        summary["reached_ranks"] = {n: int(i["rank"]) for n, i in truncated.items()}
        summary["kept_dense"] = kept_dense
        errors = [i["error"] for i in truncated.values()]
        summary["final_truncation_error_max"] = max(errors) if errors else 0.0
        return summary


__all__ = [
    "DEFAULT_PARAM_RATIO",
    "LRTMethod",
    "LowRankTrainMethod",
    "MaestroMethod",
    "Option",
    "SLTrainMethod",
    "TRPMethod",
    "distillation_loss",
    "maestro_cut",
    "sltrain_sizes",
]
