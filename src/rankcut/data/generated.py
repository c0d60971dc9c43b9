"""Calibration windows sampled from the model itself (data-free calibration), and
calibration specs that mix them with text.

Text in the model's own distribution is the data that best represents what the model
does on text nobody has shown us yet: statistics and fine-tuning on it do not pull the
model towards one domain (LLM-QAT's data-free distillation generates its training data
this way). Generation is autoregressive, so it costs about ``seq_len`` forward passes of
``batch_size`` sequences per batch.

Sampled windows are a deterministic function of the model's weights and code, its
start and end-of-text tokens, the seed, the count, the length and the sampler's
settings, so ``windows_from_spec`` keeps them in the cache folder
(``$RANKCUT_CACHE/calibration``, see ``cached_generated_windows``): a second compression
of the same model with the same seed reads them instead of sampling again.

Recovery data lives in ``recovery``, the spec vocabulary in ``spec`` and the one
sampling loop in ``sampling``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import RankcutError
from ..models.kind import is_causal_lm
from ..models.structure import model_device
from .sampling import forbidden_tokens, sample, sampling_batch, start_tokens
from .spec import (
    AUTO,
    AUTO_CAUSAL,
    AUTO_ENCODER,
    GENERATED,
    resolve_auto,
    split_spec,
    text_windows,
)
from .windows import CACHE_ENV, cache_enabled, calibration_cache_dir

__all__ = [
    "AUTO",
    "AUTO_CAUSAL",
    "AUTO_ENCODER",
    "CACHE_ENV",
    "GENERATED",
    "cached_generated_windows",
    "generated_windows",
    "resolve_spec",
    "validate_spec",
    "windows_from_spec",
]

logger = logging.getLogger(__name__)

#: Part of every cache key: a change to what a cached file holds, or to how windows are
#: sampled, bumps it so that older files are never read.
CACHE_FORMAT = 1


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


def _has_hooks(model: nn.Module) -> bool:
    """Forward hooks (on a module, or global) may change what the model computes
    without changing its weights: such a model is never served from the cache."""
    from torch.nn.modules import module as torch_module

    for name in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        if getattr(torch_module, name, None):
            return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _weights_digest(model: nn.Module) -> str | None:
    """SHA-256 of every parameter and buffer: name, dtype, shape and bytes (``None``
    when a tensor has no data, e.g. on the meta device).

    The bytes themselves, not where they came from: a folder's path and file times say
    nothing about a model changed in memory (compressed, fine-tuned, loaded in another
    dtype), and hashing SmolLM2-135M's 540 MB of float32 took about a second on a busy
    2-core machine, against the minutes that sampling takes. Tied weights are hashed once."""
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor.is_meta:
            return None
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1).contiguous().cpu()
        if flat.numel():
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _config_text(model: nn.Module) -> str:
    """The model's configuration as sorted JSON, without where it was loaded from."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return ""
    fields = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    fields["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return json.dumps(fields, sort_keys=True, default=str)


def windows_cache_key(
    model: nn.Module,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    batch_size: int | None = 8,
    temperature: float = 1.0,
) -> str | None:
    """The cache key of ``generated_windows(model, tokenizer, samples, seq_len, seed,
    ...)``: a SHA-256 of everything the windows depend on, or ``None`` when they cannot
    be cached (a model with forward hooks, or without data on its weights).

    What the windows depend on: the weights (``_weights_digest``), the code that runs
    them (the model's class and configuration, the torch and transformers versions, the
    device type: kernels differ in their last bits), what the tokenizer contributes (the
    start tokens and the end-of-text ids never drawn), and the sampler's arguments (the
    batch size too: the generator's draws are laid out batch by batch).

    Example:
        >>> windows_cache_key(model, tokenizer, 16, 512)  # doctest: +SKIP
        '3f1c...'
    """
    import transformers

    if _has_hooks(model):
        return None
    weights = _weights_digest(model)
    if weights is None:
        return None
    device = model_device(model)
    parts = {
        "format": CACHE_FORMAT,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _config_text(model),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device.type,
        "weights": weights,
        "start": start_tokens(tokenizer),
        "forbidden": forbidden_tokens(model, tokenizer),
        "samples": int(samples),
        "seq_len": int(seq_len),
        "seed": int(seed),
        "batch_size": int(batch_size or sampling_batch(model, seq_len)),
        "temperature": float(temperature),
        "draw": "multinomial",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read_cached(path: Path, samples: int, seq_len: int, start: list[int]) -> Tensor | None:
    """The windows in ``path`` if it holds what a sampling would give (shape, dtype,
    start tokens), else ``None``; a missing or unreadable file is ``None``, never an
    error (it is sampled and written again)."""
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        ids = load_file(str(path))["ids"]
        valid = (
            ids.dtype == torch.long
            and tuple(ids.shape) == (samples, seq_len)
            and bool((ids[:, : len(start)] == torch.tensor(start)).all())
            and int(ids.min()) >= 0
        )
    except Exception as err:  # a corrupt file of any kind: sample again, rewrite it
        logger.warning("ignoring unreadable calibration cache %s (%s); sampling again", path, err)
        return None
    if not valid:
        logger.warning("ignoring calibration cache %s (not the windows asked for)", path)
        return None
    return ids


@torch.no_grad()
def cached_generated_windows(
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
    """``generated_windows``, read from the cache folder when the same windows were
    sampled before (``windows_cache_key``), else sampled and written there.

    Files are ``calibration_cache_dir() / <key>.safetensors`` (``ids``, int64), written
    atomically; a corrupt or mismatching file is sampled again and replaced. With
    ``RANKCUT_CALIB_CACHE=0`` (``CACHE_ENV``), or for a model the key cannot vouch for
    (forward hooks), this is ``generated_windows``. Whether the windows were reused is
    logged at INFO level (``rankcut`` logger; the CLI's ``-q`` hides it).

    Example:
        >>> calib = cached_generated_windows(model, tokenizer, 16, 512)  # doctest: +SKIP
    """
    options = dict(batch_size=batch_size, temperature=temperature, progress=progress)
    key = None
    if cache_enabled():
        if not is_causal_lm(model):  # the error generated_windows gives, before hashing
            return generated_windows(model, tokenizer, samples, seq_len, seed, **options)
        key = windows_cache_key(
            model,
            tokenizer,
            samples,
            seq_len,
            seed,
            batch_size=batch_size,
            temperature=temperature,
        )
    if key is None:
        return generated_windows(model, tokenizer, samples, seq_len, seed, **options)
    path = calibration_cache_dir() / f"{key}.safetensors"
    ids = _read_cached(path, samples, seq_len, start_tokens(tokenizer))
    if ids is not None:
        logger.info("calibration windows: %d reused from cache %s", samples, path)
        return ids
    ids = generated_windows(model, tokenizer, samples, seq_len, seed, **options)
    try:
        from ..io.atomic import atomic_save_tensors

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({"ids": ids.contiguous()}, path)
    except OSError as err:  # an unwritable cache costs a resampling next time, no more
        logger.warning("could not cache calibration windows in %s: %s", path, err)
    else:
        logger.info("calibration windows: %d sampled, cached in %s", samples, path)
    return ids


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
    cache: bool = True,
) -> Tensor:
    """Calibration windows from a spec: a text source, ``generated``, or a mix ``A+B``.

    A mix splits ``samples`` evenly between its parts (the first parts take the
    remainder), e.g. ``shakespeare+generated`` gives half Shakespeare, half text sampled
    from ``model``. ``generated`` needs ``model`` (the dense model, before compression);
    its windows go through the cache folder (``cached_generated_windows``) unless
    ``cache`` is False or ``RANKCUT_CALIB_CACHE=0``.

    Example:
        >>> calib = windows_from_spec("shakespeare+generated", tok, 32, 512, model=lm)  # doctest: +SKIP
    """
    chunks = []
    for part, count in split_spec(spec, samples):
        if part == GENERATED:
            if model is None:
                raise RankcutError("'generated' calibration needs the model to sample from")
            sampler = cached_generated_windows if cache else generated_windows
            chunks.append(
                sampler(
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
