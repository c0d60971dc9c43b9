"""Streaming compression of a safetensors checkpoint bigger than memory: the entry point.

``stream_compress`` builds the model's skeleton on the meta device, plans the
compression exactly as ``rankcut.compress`` does (``pipelines.plan.make_plan``, so the
same config gives the same ranks), and hands the plan to the registered ``streaming``
pipeline (``rankcut/pipelines/streaming.py``), which loads, compresses, writes and
releases one decoder block at a time and can resume after an interruption.
"""

from __future__ import annotations

import os
import time

import torch
from torch import Tensor

from .distributed import Dist
from .io import CheckpointLoader, CheckpointReader, build_skeleton, check_output_dir
from .io import is_safetensors_dir as is_safetensors_dir
from .methods import MethodConfig
from .pipelines import PIPELINES
from .pipelines.plan import make_plan, model_precision
from .pipelines.streaming import FAULT_ENV as FAULT_ENV
from .pipelines.streaming import InjectedFault as InjectedFault
from .pipelines.streaming import StreamJob

__all__ = ["FAULT_ENV", "CheckpointReader", "InjectedFault", "build_skeleton", "stream_compress"]


def stream_compress(
    folder: str | os.PathLike,
    config: MethodConfig,
    calibration: Tensor,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    device: str | torch.device = "cpu",
    work_dir: str | os.PathLike | None = None,
    activation_limit_mb: float = 1024,
    overwrite: bool = False,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
    reader: CheckpointReader | None = None,
    progress: bool = True,
    dist: Dist | None = None,
    allocation_given: bool = True,
    evaluation: Tensor | None = None,
    evaluation_prefix: int = 0,
    evaluation_data: str | None = None,
) -> dict | None:
    """Compress the safetensors checkpoint in ``folder`` block by block into ``out``.

    Never holds more than one decoder block's weights (plus, with ``refit``, the dense
    model's activations at the block's stage inputs, spilled to disk like the streams),
    and the modules before the first block while the calibration windows are embedded.
    ``out`` is a rankcut folder with sharded safetensors that ``rankcut.load`` reads.
    The ranks are those ``rankcut.compress`` gives the same config in memory.

    Args:
        folder: Hugging Face folder with ``config.json`` and safetensors weights.
        config: method config with ``pipeline="sequential"`` semantics (refit honoured)
            and a data-free allocation (``uniform``, with ``rank_pattern`` overrides).
        calibration: ``(samples, seq_len)`` token ids.
        out: output folder; the partial output and the resume state live in
            ``.OUT.partial`` beside it until the run completes.
        tokenizer: saved into ``out`` when given.
        device: where each block is loaded and compressed.
        work_dir: where the state and activations go (default ``.OUT.partial/work``).
        activation_limit_mb: streams larger than this are read back from disk.
        overwrite: replace a non-empty ``out``; discard a partial output whose inputs differ.
        extra: more entries for ``rankcut.json``; ``files``: more text files for ``out``.
        reader: a ready ``CheckpointReader`` of ``folder`` (default: a new one).
        progress: show progress bars.
        dist: the process group (default: the initialized one, if any). Each rank takes
            its share of ``calibration``; rank 0 writes, the others return ``None``.
        allocation_given: whether ``config.allocation`` was chosen by the user. The
            default allocation (``global``) needs whole-model statistics: when it was
            not chosen explicitly the plan falls back to ``uniform`` with a warning,
            otherwise it is refused.
        evaluation: ``(n, L)`` held-out token windows whose perplexity before and after
            is measured on the way (block by block, like the calibration data) and
            written to ``rankcut.json`` (``perplexity``) and the report.
        evaluation_prefix: context-only positions at the start of each window (a BOS).
        evaluation_data: the name of the evaluation text, recorded with the result.

    Returns:
        The ``rankcut.json`` object written (``None`` on ranks other than 0).

    Example:
        >>> from rankcut.methods import SvdLlmConfig
        >>> stream_compress("ckpt/", SvdLlmConfig(ratio=0.2, allocation="uniform"),
        ...                 windows, "runs/ckpt-svdllm")  # doctest: +SKIP
    """
    start = time.perf_counter()
    out = check_output_dir(out, overwrite)
    reader = reader or CheckpointReader(folder)
    model = build_skeleton(folder, device)
    loader = CheckpointLoader(model, reader, device)
    # the precision of the block runs (``model_precision``), resolved for ``device``
    with model_precision(model, config, calibration, device) as config:
        plan = make_plan(
            model,
            config,
            calibration,
            progress=progress,
            pipeline="streaming",
            allocation_given=allocation_given,
        )
        job = StreamJob(
            reader,
            loader,
            out,
            work_dir=work_dir,
            activation_limit_mb=activation_limit_mb,
            tokenizer=tokenizer,
            device=device,
            extra=dict(extra or {}),
            files=dict(files or {}),
            dist=dist or Dist.current(),
            start=start,
            overwrite=overwrite,
            eval_windows=evaluation,
            eval_prefix=evaluation_prefix,
            eval_data=evaluation_data,
        )
        return PIPELINES["streaming"].run(model, plan, calibration, progress=progress, job=job)
