"""Models and tokenizers made from nothing, for ``rankcut train --arch``.

- ``train_tokenizer``: a byte-level BPE (GPT-2 style: every byte is in the alphabet, so
  any text round-trips) trained on the training text with the ``tokenizers`` library and
  wrapped as a transformers ``PreTrainedTokenizerFast``, so that it is saved with the
  model and ``rankcut.load_tokenizer`` reads it back. It adds no special tokens to text
  (no BOS), which is what ``rankcut eval``'s perplexity protocol then uses too.
- ``build_model``: a Llama-architecture causal LM from a built-in size (``ARCHS``:
  ``tiny``, about 5M parameters, a few hundred steps in minutes on 2 CPU cores;
  ``micro`` for tests and smoke runs) or a config JSON file.

Both are deterministic: the same text and seed give the same tokenizer and weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, RankcutError

logger = logging.getLogger(__name__)

#: The one special token: document separator, and BOS/EOS/PAD for transformers' sake.
END_OF_TEXT = "<|endoftext|>"

#: Vocabulary size of the trained tokenizer when none is given (the text may yield fewer).
DEFAULT_VOCAB = 8192

#: Built-in architectures (``LlamaConfig`` fields; ``vocab_size`` comes from the tokenizer).
#: ``tiny``: 4 blocks of width 256, 3.2M parameters in the blocks, 5.3M in all with an 8k
#: vocabulary (tied embeddings).
ARCHS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    "micro": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    },
}


def _chunks(text: str, size: int = 1 << 16):
    """``text`` in pieces cut at line ends, so the trainer never sees a giant string."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def train_tokenizer(text: str, vocab_size: int = DEFAULT_VOCAB):
    """A byte-level BPE tokenizer of at most ``vocab_size`` entries trained on ``text``.

    Returns a ``transformers.PreTrainedTokenizerFast`` whose BOS, EOS and PAD token is
    ``<|endoftext|>``; it adds no special tokens when encoding.

    Raises:
        ConfigError: when ``vocab_size`` cannot hold the 256 bytes and the special token.
        RankcutError: when ``text`` is empty.

    Example:
        >>> tok = train_tokenizer("to be or not to be, that is the question\\n" * 50, 300)
        >>> tok.decode(tok("to be or not")["input_ids"])
        'to be or not'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ConfigError(
            f"vocab size must be at least 257 (256 bytes + {END_OF_TEXT}), got {vocab_size!r}"
        )
    if not text.strip():
        raise RankcutError("cannot train a tokenizer on empty text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(text), trainer=trainer, length=None)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )


def arch_fields(arch: str) -> dict[str, Any]:
    """The ``LlamaConfig`` fields of a built-in ``arch`` name or of a config JSON file.

    A JSON file may hold a whole transformers ``config.json`` (its ``model_type`` must
    then be ``llama``) or just the fields to set; ``vocab_size`` is ignored (the
    tokenizer decides it).

    Example:
        >>> arch_fields("tiny")["hidden_size"]
        256
    """
    if arch in ARCHS:
        return dict(ARCHS[arch])
    path = Path(arch).expanduser()
    if not path.is_file():
        if "/" in arch or arch.endswith(".json"):
            raise RankcutError(f"--arch: file does not exist: {arch}")
        raise ConfigError(
            f"unknown --arch {arch!r}: built-in ones are {', '.join(ARCHS)}, or give a "
            "config JSON file"
        )
    try:
        fields = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RankcutError(f"--arch: cannot read {path}: {err}") from None
    if not isinstance(fields, dict):
        raise RankcutError(f"--arch: {path} must hold a JSON object of LlamaConfig fields")
    model_type = fields.pop("model_type", "llama")
    if model_type != "llama":
        raise RankcutError(
            f"--arch: {path} has model_type {model_type!r}; from-scratch training builds "
            "Llama-architecture models (model_type 'llama')"
        )
    for key in ("architectures", "transformers_version", "vocab_size", "torch_dtype", "dtype"):
        fields.pop(key, None)
    return fields


def build_model(arch: str, tokenizer, seed: int = 0) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` of ``arch`` sized to ``tokenizer``.

    The weights depend on ``seed`` only (the global torch generator is seeded here).

    Example:
        >>> tok = train_tokenizer("a b c d e f g\\n" * 20, 300)
        >>> model = build_model("micro", tok, seed=0)
        >>> model.config.vocab_size == len(tok)
        True
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = arch_fields(arch)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    special = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    try:
        config = LlamaConfig(**{**fields, **special, "vocab_size": len(tokenizer)})
    except (TypeError, ValueError) as err:
        raise RankcutError(f"--arch {arch}: invalid Llama config: {err}") from None
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RankcutError(f"--arch {arch}: cannot build the model: {err}") from None
    logger.info(
        "built %s: %d layers, hidden %d, %s parameters",
        arch,
        config.num_hidden_layers,
        config.hidden_size,
        f"{sum(p.numel() for p in model.parameters()):,}",
    )
    return model


__all__ = ["ARCHS", "DEFAULT_VOCAB", "END_OF_TEXT", "arch_fields", "build_model", "train_tokenizer"]
