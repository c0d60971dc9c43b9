"""Tokenize text and cut it into fixed-length windows of token ids."""

from __future__ import annotations

import torch

from ..errors import RankcutError

_CHUNK_CHARS = 200_000


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
    ids = tokenize(text, tokenizer)
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
