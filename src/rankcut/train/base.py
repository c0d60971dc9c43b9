"""The training-method interface behind ``rankcut train --method`` and its registry.

A method says how a model is prepared for training (``prepare``: e.g. replace the
decoder-block linears by trainable factorized layers), how its optimizer is built, what
a training step's loss is, which ``TrainingHook`` objects act during training, and what
happens at the end (``finalize``: e.g. TRP factorizes its low-rank weights). The loop in
``rankcut.train.loop`` never branches on the method's name.

A new method is a subclass registered with ``@register_train_method("name")`` in its own
module, imported by ``rankcut.train.methods`` so that the registry is complete (the
method modules import this one, never ``methods``: no import circle).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import TrainingHook


@dataclasses.dataclass
class TrainSetup:
    """What a method needs to know about the run it is part of.

    Attributes:
        targets: names of the linears it may replace or regularize (the decoder blocks'
            linears, as ``rankcut compress`` targets them), in model order.
        rank: ``--rank`` (``None`` when not given).
        param_ratio: ``--param-ratio``: the fraction of the dense targets' parameters the
            factorized targets may hold (``None`` when not given).
        options: ``--option KEY=VALUE`` pairs, values still strings (a method parses and
            validates the keys it knows and refuses the others).
        steps: the number of optimizer steps of the whole run.
        seed: the run's seed (the method's own randomness derives from it).
        lr: the learning rate.
    """

    targets: list[str]
    rank: int | None = None
    param_ratio: float | None = None
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    steps: int = 100
    seed: int = 0
    lr: float = 1e-3


class TrainMethod:
    """Dense training; subclasses override what their method changes.

    Example:
        >>> train_method("dense").name
        'dense'
    """

    name: str = "dense"
    #: One line for ``rankcut train --help``.
    summary: str = "plain dense training (the reference)"
    #: Option keys (``--option KEY=VALUE``) this method accepts.
    option_keys: tuple[str, ...] = ()
    #: Peak learning rate from scratch when ``--lr`` is not given (the authors' where
    #: they differ from dense training's).
    scratch_lr: float = 1e-3

    def check(self, setup: TrainSetup) -> None:
        """Refuse bad input before any model is built (``ConfigError``, one line)."""
        unknown = sorted(set(setup.options) - set(self.option_keys))
        if unknown:
            known = ", ".join(self.option_keys) or "none"
            raise ConfigError(
                f"--method {self.name} does not take option(s) {', '.join(unknown)} "
                f"(it takes: {known})"
            )

    def prepare(self, model: nn.Module, setup: TrainSetup) -> None:
        """Change ``model`` in place before training (deterministic given ``setup.seed``:
        a resumed run calls it again and then loads the saved state)."""

    def optimizer(self, model: nn.Module, setup: TrainSetup) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters (AdamW by default)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)

    def loss(self, model: nn.Module, ids: Tensor, step: int) -> Tensor:
        """The loss of one training batch ``ids`` (``(batch, seq)`` token ids)."""
        return model(input_ids=ids, labels=ids).loss

    def hooks(self, model: nn.Module, setup: TrainSetup) -> list[TrainingHook]:
        """Hooks that act during training (regularizers, rank schedules)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep besides the model and optimizer (JSON-able)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` when a run resumes."""

    def finalize(self, model: nn.Module, setup: TrainSetup) -> dict[str, Any]:
        """Turn the trained model into the one that is saved; a summary for the report."""
        return {}


#: Registered training method classes by name (a run makes its own instance: methods
#: may keep state, e.g. a rank schedule, in ``state_dict``).
TRAIN_METHODS: dict[str, type[TrainMethod]] = {}


def register_train_method(name: str) -> Callable[[type[TrainMethod]], type[TrainMethod]]:
    """Register a ``TrainMethod`` subclass under ``name``."""

    def wrap(cls: type[TrainMethod]) -> type[TrainMethod]:
        if not (isinstance(cls, type) and issubclass(cls, TrainMethod)):
            raise ConfigError(f"{cls!r} is not a TrainMethod subclass")
        cls.name = name
        TRAIN_METHODS[name] = cls
        return cls

    return wrap


def train_method(name: str) -> TrainMethod:
    """A fresh instance of the registered method ``name`` (one-line error if unknown)."""
    if name not in TRAIN_METHODS:
        raise ConfigError(
            f"unknown training method {name!r}; known: {', '.join(sorted(TRAIN_METHODS))}"
        )
    return TRAIN_METHODS[name]()


register_train_method("dense")(TrainMethod)


__all__ = ["TRAIN_METHODS", "TrainMethod", "TrainSetup", "register_train_method", "train_method"]
