"""Calibration windows sampled from the model itself (data-free calibration).

Text in the model's own distribution is the data that best represents what the model
does on text nobody has shown us yet: statistics and fine-tuning on it do not pull the
model towards one domain (LLM-QAT's data-free distillation generates its training data
this way). Generation is autoregressive, so it costs about ``seq_len`` forward passes of
``batch_size`` sequences per batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import RankcutError
from .distill import DistillWindows
from .windows import bos_prefix

#: The calibration spec that asks for model-generated windows (``--calib generated``).
GENERATED = "generated"
#: The default calibration spec, resolved per model by ``resolve_spec``.
AUTO = "auto"
#: What ``auto`` means for a model that can generate, and for one that cannot (encoders).
AUTO_CAUSAL = "shakespeare+generated"
AUTO_ENCODER = "shakespeare"


def resolve_spec(spec: str, model: nn.Module) -> str:
    """``auto`` -> half built-in text, half text sampled from the model for causal LMs
    (statistics that do not lean towards one domain), built-in text for encoders."""
    if spec != AUTO:
        return spec
    can_generate = getattr(model, "can_generate", None)
    return AUTO_CAUSAL if callable(can_generate) and can_generate() else AUTO_ENCODER


def start_tokens(tokenizer) -> list[int]:
    """What a generated window starts with: the tokenizer's BOS prefix if it adds one,
    else its BOS token, else its EOS token (the document separator of models trained
    without BOS)."""
    prefix = bos_prefix(tokenizer)
    if prefix:
        return prefix
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [int(token_id)]
    raise RankcutError("the tokenizer has neither a BOS nor an EOS token to start generation")


@torch.no_grad()
def generated_windows(
    model: nn.Module,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    batch_size: int = 8,
    temperature: float = 1.0,
    progress: bool = True,
) -> Tensor:
    """``samples`` windows of ``seq_len`` tokens sampled from ``model`` (a causal LM).

    Sampling is plain ancestral sampling at ``temperature`` (no top-k/top-p, which would
    narrow the distribution) and is seeded; the global RNG state is left untouched.

    Example:
        >>> calib = generated_windows(model, tokenizer, 32, 512)  # doctest: +SKIP
    """
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise RankcutError(
            f"generated calibration needs a causal LM; {type(model).__name__} cannot generate"
        )
    if samples < 1 or seq_len < 2:
        raise RankcutError(f"need samples >= 1 and seq-len >= 2, got {samples} and {seq_len}")
    if temperature <= 0:
        raise RankcutError(f"temperature must be > 0, got {temperature}")
    start = start_tokens(tokenizer)
    if len(start) >= seq_len:
        raise RankcutError(f"seq-len {seq_len} leaves no room after the start tokens {start}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batches = range(0, samples, batch_size)
        for first in tqdm(batches, desc="generating calibration", disable=not progress):
            n = min(batch_size, samples - first)
            ids = torch.tensor([start] * n, device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len - len(start),
                min_new_tokens=seq_len - len(start),
                pad_token_id=start[-1],
            )
            rows.append(out[:, :seq_len].cpu())
    model.train(was_training)
    return torch.cat(rows)


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
    from .corpora import load_text
    from .windows import calibration_windows

    parts = _parts(spec, samples)
    counts = _split(samples, len(parts))
    chunks = []
    for part, count in zip(parts, counts, strict=True):
        if part == GENERATED:
            if model is None:
                raise RankcutError("'generated' calibration needs the model to sample from")
            chunks.append(
                generated_windows(
                    model, tokenizer, count, seq_len, seed, progress=progress, batch_size=batch_size
                )
            )
        else:
            chunks.append(calibration_windows(load_text(part), tokenizer, count, seq_len, seed))
    return torch.cat(chunks)


def _parts(spec: str, samples: int) -> list[str]:
    parts = [p.strip() for p in spec.split("+")]
    if not all(parts):
        raise RankcutError(f"empty part in calibration spec {spec!r}")
    if samples < len(parts):
        raise RankcutError(
            f"{samples} samples cannot be split over the {len(parts)} parts of {spec!r}"
        )
    return parts


def _split(samples: int, parts: int) -> list[int]:
    """``samples`` split evenly over ``parts``, the first parts taking the remainder."""
    return [samples // parts + (i < samples % parts) for i in range(parts)]


def validate_spec(spec: str) -> None:
    """Fail early (before loading a model) on a spec whose text parts do not exist."""
    from .corpora import load_text

    for part in (AUTO_CAUSAL if spec == AUTO else spec).split("+"):
        part = part.strip()
        if part and part != GENERATED:
            load_text(part)


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
    dense model's behaviour without leaning towards one domain), built-in text else."""
    if spec != AUTO:
        return spec
    can_generate = getattr(model, "can_generate", None)
    return GENERATED if callable(can_generate) and can_generate() else AUTO_ENCODER


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
    """
    from .corpora import load_text
    from .windows import calibration_windows, tokenize

    count = steps if count is None else count
    if count < 1:
        raise RankcutError(f"need at least one recovery window, got {count}")
    parts = _parts(spec, count)
    if GENERATED in parts:
        return _distill_windows(parts, tokenizer, count, seq_len, seed + 1, model, progress)
    if len(parts) > 1:
        return windows_from_spec(spec, tokenizer, count, seq_len, seed + 1, progress=progress)
    text = load_text(spec)
    available = len(tokenize(text, tokenizer)) // seq_len
    return calibration_windows(text, tokenizer, min(count, available), seq_len, seed + 1)


def _distill_windows(parts, tokenizer, count, seq_len, seed, model, progress) -> DistillWindows:
    """Windows of the spec ``parts`` with the dense ``model``'s top-k targets: its samples
    carry the targets it computed while sampling, text parts get them from one forward
    pass."""
    from .corpora import load_text
    from .distill import sample_distill_windows, teacher_targets
    from .windows import calibration_windows

    if model is None:
        raise RankcutError("'generated' recovery data needs the model to sample from")
    chunks = []
    for part, n in zip(parts, _split(count, len(parts)), strict=True):
        if part == GENERATED:
            chunks.append(
                sample_distill_windows(model, tokenizer, n, seq_len, seed, progress=progress)
            )
        else:
            text = calibration_windows(load_text(part), tokenizer, n, seq_len, seed)
            chunks.append(teacher_targets(model, text, progress=progress))
    return DistillWindows.cat(chunks)
