"""Tokenize text and cut it into fixed-length windows of token ids.

The token ids of a whole calibration text are kept in the cache folder
(``calibration_cache_dir``), keyed by the text and the tokenizer's full description:
tokenizing Shakespeare took seconds of every compression, reading its ids back does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import RankcutError

logger = logging.getLogger(__name__)

_CHUNK_CHARS = 200_000

#: Set to ``0`` (or ``false``, ``no``, ``off``) to tokenize and sample calibration data
#: afresh on every run, neither reading nor writing the cache folder.
CACHE_ENV = "RANKCUT_CALIB_CACHE"


def cache_enabled() -> bool:
    """Whether calibration data goes through the cache folder (``CACHE_ENV``).

    Example:
        >>> cache_enabled() in (True, False)
        True
    """
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def calibration_cache_dir() -> Path:
    """The folder of cached calibration data: ``calibration`` in rankcut's cache folder.

    Example:
        >>> calibration_cache_dir().name
        'calibration'
    """
    from ..models.sources import cache_dir

    return cache_dir() / "calibration"


def _tokenizer_key(tokenizer) -> str | None:
    """A description of everything that maps text to ids: the fast tokenizer's own
    serialization (vocabulary, merges, normalizer, pre-tokenizer, added tokens), its
    class and the library versions; ``None`` for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        import tokenizers
        import transformers

        described = backend.to_str()
    except Exception:  # noqa: BLE001 - an undescribable tokenizer is simply not cached
        return None
    parts = [
        type(tokenizer).__qualname__,
        transformers.__version__,
        tokenizers.__version__,
        str(_CHUNK_CHARS),
        hashlib.sha256(described.encode()).hexdigest(),
    ]
    return json.dumps(parts)


def tokenize_cached(text: str, tokenizer) -> list[int]:
    """``tokenize(text, tokenizer)`` (the whole text), its ids read from the cache folder
    when this text was tokenized by this tokenizer before, else written there.

    A corrupt file is tokenized again and replaced, an unwritable folder is logged; with
    ``RANKCUT_CALIB_CACHE=0`` or a tokenizer without a description this is ``tokenize``.

    Example:
        >>> ids = tokenize_cached(load_text("shakespeare"), tokenizer)  # doctest: +SKIP
    """
    described = _tokenizer_key(tokenizer) if cache_enabled() else None
    if described is None:
        return tokenize(text, tokenizer)
    digest = hashlib.sha256(described.encode())
    digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    path = calibration_cache_dir() / f"tokens-{digest.hexdigest()}.safetensors"
    if path.is_file():
        try:
            from safetensors.torch import load_file

            ids = load_file(str(path))["ids"]
            if ids.dtype == torch.long and ids.ndim == 1:
                return ids.tolist()
            logger.warning("ignoring calibration cache %s (not token ids)", path)
        except Exception as err:  # noqa: BLE001 - any corrupt file: tokenize again
            logger.warning("ignoring unreadable calibration cache %s (%s)", path, err)
    ids = tokenize(text, tokenizer)
    try:
        from ..io.atomic import atomic_save_tensors

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({"ids": torch.tensor(ids, dtype=torch.long)}, path)
    except OSError as err:
        logger.warning("could not cache calibration tokens in %s: %s", path, err)
    return ids


def bos_prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer itself puts before text (``[]`` for most modern LMs).

    Models whose tokenizer adds a BOS token by default were trained with it, so it is
    kept; tokenizers that add none get none (the perplexity protocol's "no BOS unless
    the model needs one").
    """
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain) and with_special[-len(plain) :] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    return []


def tokenize(text: str, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens, stopping once ``max_tokens`` are had.

    Long texts are tokenized in paragraph-aligned chunks so that asking for a few
    thousand tokens of a large corpus does not tokenize all of it.
    """
    ids: list[int] = []
    start = 0
    while start < len(text) and (max_tokens is None or len(ids) < max_tokens):
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut if cut > start else end
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return ids if max_tokens is None else ids[:max_tokens]


def calibration_windows(
    text: str, tokenizer, samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seq_len`` tokens drawn at random (seeded).

    Windows start with the tokenizer's own prefix (BOS) when it adds one, so the model
    sees inputs shaped as in training.

    Raises:
        RankcutError: when the text holds fewer than ``samples * seq_len`` tokens.
    """
    if samples < 1 or seq_len < 2:
        raise RankcutError(f"need samples >= 1 and seq-len >= 2, got {samples} and {seq_len}")
    prefix = bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    ids = tokenize_cached(text, tokenizer)
    available = len(ids) // body
    if available < samples:
        raise RankcutError(
            f"calibration text is too short: {len(ids)} tokens, need samples x seq-len = "
            f"{samples} x {seq_len} = {samples * seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=gen)[:samples].sort().values.tolist()
    rows = [prefix + ids[i * body : (i + 1) * body] for i in chosen]
    return torch.tensor(rows, dtype=torch.long)


def evaluation_windows(text: str, tokenizer, tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``tokens`` tokens of ``text`` as consecutive non-overlapping windows.

    Each window holds ``seq_len`` text tokens, preceded by the BOS prefix when the model
    needs one. A tail shorter than ``seq_len`` is dropped.

    Raises:
        RankcutError: when the text has fewer than ``seq_len`` tokens.
    """
    if seq_len < 2 or tokens < seq_len:
        raise RankcutError(f"need seq-len >= 2 and tokens >= seq-len, got {tokens}, {seq_len}")
    ids = tokenize(text, tokenizer, max_tokens=tokens)
    n = len(ids) // seq_len
    if n == 0:
        raise RankcutError(
            f"evaluation text is too short: {len(ids)} tokens, need at least seq-len={seq_len}"
        )
    prefix = bos_prefix(tokenizer)
    rows = [prefix + ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)
