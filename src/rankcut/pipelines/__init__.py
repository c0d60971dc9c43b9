"""Pipelines: registered ways to execute one compression plan.

``plan.make_plan`` computes targets -> statistics -> allocation -> overrides once;
a pipeline registered with ``@register_pipeline`` executes it:

- ``whole`` (``whole.py``): one calibration pass over the dense model, then every target;
- ``sequential`` (``sequential.py``): decoder block by decoder block on the compressed
  prefix, each matrix refitted to the dense outputs;
- ``streaming`` (``streaming.py``): ``sequential`` with one block read from the checkpoint
  at a time (entry point ``rankcut.streaming.stream_compress``).

``auto`` (the default ``MethodConfig.pipeline``) resolves to ``sequential`` or ``whole``.
"""

from . import sequential, streaming, whole  # noqa: F401  (registration side effects)
from .common import factorize_into
from .plan import Plan, make_plan
from .registry import (
    AUTO,
    PIPELINES,
    PipelineSpec,
    config_pipelines,
    get_pipeline,
    register_pipeline,
)
from .sequential import advance, check_sequential, compress_block, resolve_pipeline, run_sequential
from .whole import run_whole

__all__ = [
    "AUTO",
    "PIPELINES",
    "PipelineSpec",
    "Plan",
    "advance",
    "check_sequential",
    "compress_block",
    "config_pipelines",
    "factorize_into",
    "get_pipeline",
    "make_plan",
    "register_pipeline",
    "resolve_pipeline",
    "run_sequential",
    "run_whole",
]
