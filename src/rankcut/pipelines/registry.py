"""The pipeline registry: how a plan is executed.

A pipeline takes the model and a ``Plan`` (targets, ranks, statistics: see ``plan.py``)
and replaces the planned matrices by their factorized layers. Adding one is a new module
in this package with a function decorated by ``@register_pipeline(name)``, imported in
``pipelines/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class PipelineSpec:
    """A registered pipeline.

    Attributes:
        name: what ``MethodConfig.pipeline`` (or the entry point) calls it.
        run: ``run(model, plan, calibration, *, progress, **options)``.
        in_memory: runs on a model held whole in memory, so its plan can gather
            whole-model statistics (spectra, loss gradients). ``False`` for the streaming
            pipeline, which holds one decoder block at a time: ranks must be known
            before the first block is read.
        selectable: may be named by ``MethodConfig.pipeline`` (streaming is chosen by
            its entry point, ``rankcut.streaming.stream_compress``, instead).
        summary: one line for listings.
    """

    name: str
    run: Callable[..., None]
    in_memory: bool = True
    selectable: bool = True
    summary: str = ""


PIPELINES: dict[str, PipelineSpec] = {}


def register_pipeline(
    name: str, *, in_memory: bool = True, selectable: bool = True, summary: str = ""
):
    """Register ``run(model, plan, calibration, *, progress, **options)`` as ``name``.

    Example:
        >>> @register_pipeline("noop", selectable=False)
        ... def run_noop(model, plan, calibration, *, progress=True):
        ...     pass
        >>> PIPELINES.pop("noop").name
        'noop'
    """

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        PIPELINES[name] = PipelineSpec(name, fn, in_memory, selectable, summary)
        return fn

    return wrap


def config_pipelines() -> tuple[str, ...]:
    """Names a ``MethodConfig.pipeline`` may take: ``auto`` and the selectable ones."""
    return (AUTO, *sorted(n for n, p in PIPELINES.items() if p.selectable))


def get_pipeline(name: str) -> PipelineSpec:
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; known: {', '.join(sorted(PIPELINES))}")
    return PIPELINES[name]
