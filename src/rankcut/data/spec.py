"""Data specs: a text source, ``generated`` (text sampled from the model), or a mix ``A+B``.

The vocabulary and the splitting rule that calibration (``generated``) and recovery
(``recovery``) specs share, apart from either, so that neither imports the other.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import RankcutError
from ..models.kind import is_causal_lm

#: The spec part that asks for model-generated windows (``--calib generated``).
GENERATED = "generated"
#: The default spec, resolved per model (``generated.resolve_spec``,
#: ``recovery.resolve_recovery_spec``).
AUTO = "auto"
#: What calibration ``auto`` means for a model that can generate, and for one that
#: cannot (encoders; also recovery's ``auto`` for them).
AUTO_CAUSAL = "shakespeare+generated"
AUTO_ENCODER = "shakespeare"


def resolve_auto(spec: str, model: nn.Module, causal: str) -> str:
    """``spec``, with ``auto`` read as ``causal`` for a causal LM and as
    ``AUTO_ENCODER`` (built-in text) for a model that cannot generate.

    Example:
        >>> import torch
        >>> resolve_auto("auto", torch.nn.Linear(2, 2), GENERATED)
        'shakespeare'
    """
    if spec != AUTO:
        return spec
    return causal if is_causal_lm(model) else AUTO_ENCODER


def split_spec(spec: str, samples: int) -> list[tuple[str, int]]:
    """The parts of ``spec`` with the windows each gives: ``samples`` split evenly, the
    first parts taking the remainder.

    Example:
        >>> split_spec("shakespeare+generated", 5)
        [('shakespeare', 3), ('generated', 2)]
    """
    parts = [p.strip() for p in spec.split("+")]
    if not all(parts):
        raise RankcutError(f"empty part in calibration spec {spec!r}")
    if samples < len(parts):
        raise RankcutError(
            f"{samples} samples cannot be split over the {len(parts)} parts of {spec!r}"
        )
    counts = [samples // len(parts) + (i < samples % len(parts)) for i in range(len(parts))]
    return list(zip(parts, counts, strict=True))


def text_windows(part: str, tokenizer, samples: int, seq_len: int, seed: int) -> Tensor:
    """``samples`` random windows (seeded) of the text source ``part``.

    Example:
        >>> calib = text_windows("shakespeare", tokenizer, 16, 512, 0)  # doctest: +SKIP
    """
    from .corpora import load_text
    from .windows import calibration_windows

    return calibration_windows(load_text(part), tokenizer, samples, seq_len, seed)
