"""``galore``: the peer of the low-rank methods, from the ``galore-torch`` package.

GaLore (Zhao et al., 2024) keeps every weight full-rank and projects the gradient of
each targeted matrix onto its top-``rank`` singular subspace inside the optimizer (the
subspace is recomputed every ``update_proj_gap`` steps), so that Adam's two moments are
``rank x n`` instead of ``m x n``. The optimizer is ``galore_torch``'s ``GaLoreAdamW``,
used as its authors ship it, never rewritten: the targeted weights form one parameter
group with ``rank``, ``update_proj_gap``, ``scale`` and ``proj_type``; every other
trainable parameter (embeddings, norms) is a plain AdamW group.

``--rank R`` is the projection rank. ``--param-ratio P`` gives the rank that the
factorized methods get at that budget: the uniform rank ``r = floor(P sum(m n) /
sum(m + n))`` over the targets (the same ``r (m + n)`` cost rule as ``rankcut
compress``), so that GaLore at ``P`` and LRT at ``P`` project or factorize at the same
rank. Neither given: ``P = 0.5``.

Installing: ``galore-torch`` 1.0 declares ``bitsandbytes`` (for its 8-bit optimizer) and
an unpinned ``torch``; rankcut installs it with ``pip install --no-deps galore-torch``
(see docs/train.md). Its package ``__init__`` imports the 8-bit optimizer, so without
bitsandbytes ``galore_torch.adamw`` is imported without running that ``__init__``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError, RankcutError
from .base import TrainMethod, register_train_method

if TYPE_CHECKING:
    from .base import TrainSetup

#: galore-torch's projection types.
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")

#: The budget whose uniform rank is GaLore's when neither --rank nor --param-ratio is given.
DEFAULT_RATIO = 0.5

INSTALL_HINT = "pip install --no-deps galore-torch (see docs/train.md)"


def galore_adamw() -> type[torch.optim.Optimizer]:
    """galore-torch's ``GaLoreAdamW`` class (one-line error when it is not installed).

    Example:
        >>> galore_adamw().__name__  # doctest: +SKIP
        'AdamW'
    """
    loaded = sys.modules.get("galore_torch.adamw")
    if loaded is not None and hasattr(loaded, "AdamW"):
        return loaded.AdamW  # imported before (perhaps without the package __init__)
    try:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW
    except ModuleNotFoundError as err:
        if err.name == "galore_torch":
            raise RankcutError(f"--method galore needs galore-torch: {INSTALL_HINT}") from None
        if err.name != "bitsandbytes":
            raise RankcutError(f"galore-torch cannot be imported: {err}") from None
    # galore_torch/__init__.py imports its 8-bit AdamW, which needs bitsandbytes (a large,
    # CUDA-oriented package) although GaLoreAdamW does not: import the submodule with a
    # bare package object in place of that __init__.
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        raise RankcutError(f"--method galore needs galore-torch: {INSTALL_HINT}")
    package = types.ModuleType("galore_torch")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["galore_torch"] = package
    try:
        module = importlib.import_module("galore_torch.adamw")
    except ImportError as err:
        del sys.modules["galore_torch"]
        raise RankcutError(f"galore-torch cannot be imported: {err}") from None
    return module.AdamW


def uniform_rank(shapes: list[tuple[int, int]], ratio: float) -> int:
    """The one rank at which ``shapes`` (``(out, in)`` each) hold ``ratio`` of their
    parameters as ``r (m + n)`` factor pairs: ``floor(ratio sum(m n) / sum(m + n))``, >= 1.

    Example:
        >>> uniform_rank([(256, 256), (688, 256)], 0.5)
        82
    """
    mn = sum(m * n for m, n in shapes)
    mpn = sum(m + n for m, n in shapes)
    return max(1, math.floor(ratio * mn / mpn))


@register_train_method("galore")
class GaLoreMethod(TrainMethod):
    """Dense weights trained by galore-torch's ``GaLoreAdamW`` (gradient projection).

    Options: ``update_proj_gap`` (steps between subspace updates, 200), ``scale`` (of
    the projected update, 1.0: galore-torch's scripts pair 0.25 with a 10x larger lr),
    ``proj_type`` (``std``).

    Example:
        >>> from rankcut.train.methods import train_method
        >>> train_method("galore").option_keys
        ('update_proj_gap', 'scale', 'proj_type')
    """

    summary = "dense weights, gradients projected to rank R inside the optimizer (galore-torch)"
    option_keys = ("update_proj_gap", "scale", "proj_type")

    def __init__(self) -> None:
        self.rank: int | None = None

    @staticmethod
    def parse_options(options: dict[str, str]) -> dict[str, Any]:
        """The options with their defaults, parsed and checked (``ConfigError``)."""
        parsed: dict[str, Any] = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
        try:
            if "update_proj_gap" in options:
                parsed["update_proj_gap"] = int(options["update_proj_gap"])
            if "scale" in options:
                parsed["scale"] = float(options["scale"])
        except ValueError as err:
            raise ConfigError(f"--method galore: bad option value: {err}") from None
        if "proj_type" in options:
            parsed["proj_type"] = options["proj_type"]
        if parsed["update_proj_gap"] < 1:
            raise ConfigError("--method galore: update_proj_gap must be >= 1")
        if not (math.isfinite(parsed["scale"]) and parsed["scale"] > 0):
            raise ConfigError("--method galore: scale must be a positive number")
        if parsed["proj_type"] not in PROJ_TYPES:
            raise ConfigError(f"--method galore: proj_type must be one of {', '.join(PROJ_TYPES)}")
        return parsed

    def check(self, setup: TrainSetup) -> None:
        super().check(setup)
        self.parse_options(setup.options)

    def projection_rank(self, model: nn.Module, setup: TrainSetup) -> int:
        """``--rank``, or the uniform rank of ``--param-ratio`` (default 0.5) over the targets."""
        from ..layers import dense_shape

        if setup.rank is not None:
            return setup.rank
        ratio = setup.param_ratio if setup.param_ratio is not None else DEFAULT_RATIO
        shapes = [dense_shape(model.get_submodule(name)) for name in setup.targets]
        return uniform_rank(shapes, ratio)

    def optimizer(self, model: nn.Module, setup: TrainSetup) -> torch.optim.Optimizer:
        options = self.parse_options(setup.options)
        self.rank = self.projection_rank(model, setup)
        projected = [model.get_submodule(name).weight for name in setup.targets]
        ids = {id(p) for p in projected}
        regular = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [
            {"params": regular},
            {"params": projected, "rank": self.rank, **options},
        ]
        # Adam's betas and eps as torch's AdamW (the dense reference) has them.
        return galore_adamw()(
            groups,
            lr=setup.lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            no_deprecation_warning=True,
        )

    def finalize(self, model: nn.Module, setup: TrainSetup) -> dict[str, Any]:
        return {"projection_rank": self.rank, **self.parse_options(setup.options)}


__all__ = ["GaLoreMethod", "galore_adamw", "uniform_rank"]
