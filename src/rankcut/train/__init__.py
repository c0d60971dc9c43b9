"""Low rank while training: the home of training-time layers' loops and hooks.

Regularizers and rank schedules (TRP's periodic truncation and nuclear norm, Maestro's
group lasso and progressive shrinking, ...) are ``TrainingHook`` objects: usable in a
plain PyTorch loop (call ``on_backward`` after ``loss.backward()`` and ``on_step`` after
``optimizer.step()``) and, wrapped by ``as_trainer_callback``, in a transformers
``Trainer``. A hook is added by subclassing ``TrainingHook`` and registering it with
``@register_hook("name")``; training-time layers themselves live in ``rankcut.layers``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError


class TrainingHook:
    """Something that acts on a model during training, step by step.

    Subclasses override what they need; the defaults do nothing.

    Example:
        >>> import torch
        >>> class CountSteps(TrainingHook):
        ...     def __init__(self):
        ...         self.steps = 0
        ...     def on_step(self, model, step):
        ...         self.steps += 1
        >>> hook = CountSteps()
        >>> hook.on_step(torch.nn.Linear(2, 2), 0)
        >>> hook.steps
        1
    """

    def on_backward(self, model: nn.Module, step: int) -> None:
        """After ``loss.backward()``, before the optimizer step (gradients are there)."""

    def on_step(self, model: nn.Module, step: int) -> None:
        """After ``optimizer.step()``."""

    def penalty(self, model: nn.Module):
        """A term added to the loss (``None``: nothing)."""
        return None


#: Registered hook classes by name (``rankcut train --option`` will look them up).
HOOKS: dict[str, type[TrainingHook]] = {}


def register_hook(name: str) -> Callable[[type[TrainingHook]], type[TrainingHook]]:
    """Register a ``TrainingHook`` subclass under ``name``.

    Example:
        >>> @register_hook("noop")
        ... class Noop(TrainingHook):
        ...     pass
        >>> HOOKS.pop("noop").__name__
        'Noop'
    """

    def wrap(cls: type[TrainingHook]) -> type[TrainingHook]:
        if not (isinstance(cls, type) and issubclass(cls, TrainingHook)):
            raise ConfigError(f"{cls!r} is not a TrainingHook subclass")
        HOOKS[name] = cls
        return cls

    return wrap


def as_trainer_callback(hook: TrainingHook):
    """A transformers ``TrainerCallback`` that runs ``hook`` inside ``Trainer``.

    ``on_backward`` runs at the callback's ``on_pre_optimizer_step`` (gradients are
    there), ``on_step`` at ``on_step_end``.

    Example:
        >>> callback = as_trainer_callback(TrainingHook())  # doctest: +SKIP
        >>> Trainer(model, args, callbacks=[callback])  # doctest: +SKIP
    """
    from transformers import TrainerCallback

    class _HookCallback(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            hook.on_backward(model, state.global_step)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            hook.on_step(model, state.global_step)

    return _HookCallback()


__all__ = ["HOOKS", "TrainingHook", "as_trainer_callback", "register_hook"]
