"""Calibration windows sampled from the model itself (data-free calibration), and
calibration specs that mix them with text.

Text in the model's own distribution is the data that best represents what the model
does on text nobody has shown us yet: statistics and fine-tuning on it do not pull the
model towards one domain (LLM-QAT's data-free distillation generates its training data
this way). Generation is autoregressive, so it costs about ``seq_len`` forward passes of
``batch_size`` sequences per batch.

Recovery data lives in ``recovery``, the spec vocabulary in ``spec`` and the one
sampling loop in ``sampling``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import RankcutError
from .sampling import sample
from .spec import (
    AUTO,
    AUTO_CAUSAL,
    AUTO_ENCODER,
    GENERATED,
    resolve_auto,
    split_spec,
    text_windows,
)

__all__ = [
    "AUTO",
    "AUTO_CAUSAL",
    "AUTO_ENCODER",
    "GENERATED",
    "generated_windows",
    "resolve_spec",
    "validate_spec",
    "windows_from_spec",
]


def resolve_spec(spec: str, model: nn.Module) -> str:
    """``auto`` -> half built-in text, half text sampled from the model for causal LMs
    (statistics that do not lean towards one domain), built-in text for encoders.

    Example:
        >>> resolve_spec("auto", torch.nn.Linear(2, 2))
        'shakespeare'
    """
    return resolve_auto(spec, model, AUTO_CAUSAL)


@torch.no_grad()
def generated_windows(
    model: nn.Module,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    batch_size: int = 8,
    **options,
) -> Tensor:
    """``samples`` windows of ``seq_len`` tokens sampled from ``model`` (a causal LM).

    ``options`` are ``sampling.sample``'s (``temperature``, ``progress``); 8 sequences
    are sampled at once unless ``batch_size`` says otherwise.

    Plain ancestral sampling at ``temperature`` (no top-k/top-p, which would narrow
    the distribution), seeded, the global RNG state left untouched: the loop of
    ``sampling.sample`` with its ``multinomial`` draw, which draws what transformers'
    ``generate`` drew here before (the same windows for the same seed). End-of-text
    tokens are never drawn.

    Example:
        >>> calib = generated_windows(model, tokenizer, 32, 512)  # doctest: +SKIP
    """
    batches = sample(
        model,
        tokenizer,
        samples,
        seq_len,
        seed,
        batch_size=batch_size,
        draw="multinomial",
        desc="generating calibration",
        **options,
    )
    return torch.cat([ids for ids, _ in batches])


def windows_from_spec(
    spec: str,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    model: nn.Module | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> Tensor:
    """Calibration windows from a spec: a text source, ``generated``, or a mix ``A+B``.

    A mix splits ``samples`` evenly between its parts (the first parts take the
    remainder), e.g. ``shakespeare+generated`` gives half Shakespeare, half text sampled
    from ``model``. ``generated`` needs ``model`` (the dense model, before compression).

    Example:
        >>> calib = windows_from_spec("shakespeare+generated", tok, 32, 512, model=lm)  # doctest: +SKIP
    """
    chunks = []
    for part, count in split_spec(spec, samples):
        if part == GENERATED:
            if model is None:
                raise RankcutError("'generated' calibration needs the model to sample from")
            chunks.append(
                generated_windows(
                    model, tokenizer, count, seq_len, seed, progress=progress, batch_size=batch_size
                )
            )
        else:
            chunks.append(text_windows(part, tokenizer, count, seq_len, seed))
    return torch.cat(chunks)


def validate_spec(spec: str) -> None:
    """Fail early (before loading a model) on a spec whose text parts do not exist.

    Example:
        >>> validate_spec("shakespeare+generated")
    """
    from .corpora import load_text

    for part in (AUTO_CAUSAL if spec == AUTO else spec).split("+"):
        part = part.strip()
        if part and part != GENERATED:
            load_text(part)
