"""Training windows for a recovery fine-tune of the compressed model.

By default (``auto``) they are text sampled from the dense model itself, with its top-k
next-token targets (``distill.DistillWindows``): what recovers the dense model's
behaviour without leaning towards one domain, and trains with no teacher in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import RankcutError
from .distill import DistillWindows, sample_distill_windows, teacher_targets
from .spec import GENERATED, resolve_auto, split_spec, text_windows

#: Tokens per recovery window (one window per step). Shorter windows than the 512 of
#: calibration and evaluation give more optimizer steps for the same tokens: on
#: SmolLM2-135M at 0.2, 256 fresh windows of 256 tokens recovered more (fortunes 36.6)
#: than 128 of 512 (37.6) for the same sampling and training time.
RECOVERY_SEQ_LEN = 256
#: Default recovery steps: one fresh sampled window each, about 14 minutes of sampling and
#: training for SmolLM2-135M on 2 CPU cores.
RECOVERY_STEPS = 300


def resolve_recovery_spec(spec: str, model: nn.Module) -> str:
    """``auto`` -> text sampled from the model itself for causal LMs (what recovers the
    dense model's behaviour without leaning towards one domain), built-in text else.

    Example:
        >>> resolve_recovery_spec("auto", torch.nn.Linear(2, 2))
        'shakespeare'
    """
    return resolve_auto(spec, model, GENERATED)


def recovery_windows(
    spec: str,
    tokenizer,
    steps: int,
    seq_len: int,
    seed: int = 0,
    *,
    count: int | None = None,
    model: nn.Module | None = None,
    progress: bool = True,
) -> Tensor | DistillWindows:
    """Training windows for a recovery fine-tune of ``steps`` steps (one window each).

    A spec with generated text gives ``DistillWindows``: the windows with the dense
    ``model``'s top-k next-token targets, so that training needs no teacher pass; a text
    spec gives plain token ids. ``count`` distinct windows (default: ``steps``, each
    window seen once; at most what a text holds), drawn with seed ``seed + 1`` so that
    they are not the calibration windows.

    Example:
        >>> data = recovery_windows("generated", tokenizer, 300, 256, model=dense)  # doctest: +SKIP
    """
    from .corpora import load_text
    from .windows import calibration_windows, tokenize

    count = steps if count is None else count
    if count < 1:
        raise RankcutError(f"need at least one recovery window, got {count}")
    parts = split_spec(spec, count)
    if any(part == GENERATED for part, _ in parts):
        return _distill_windows(parts, tokenizer, seq_len, seed + 1, model, progress)
    if len(parts) > 1:
        return torch.cat([text_windows(p, tokenizer, n, seq_len, seed + 1) for p, n in parts])
    text = load_text(spec)
    available = len(tokenize(text, tokenizer)) // seq_len
    return calibration_windows(text, tokenizer, min(count, available), seq_len, seed + 1)


def _distill_windows(parts, tokenizer, seq_len, seed, model, progress) -> DistillWindows:
    """Windows of the spec ``parts`` (``(part, count)``) with the dense ``model``'s top-k
    targets: its samples carry the targets it computed while sampling, text parts get
    them from one forward pass."""
    if model is None:
        raise RankcutError("'generated' recovery data needs the model to sample from")
    chunks = []
    for part, n in parts:
        if part == GENERATED:
            chunks.append(
                sample_distill_windows(model, tokenizer, n, seq_len, seed, progress=progress)
            )
        else:
            text = text_windows(part, tokenizer, n, seq_len, seed)
            chunks.append(teacher_targets(model, text, progress=progress))
    return DistillWindows.cat(chunks)
