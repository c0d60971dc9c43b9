"""Perplexity of a model whose decoder blocks ran one at a time (the streaming pipeline).

The evaluation windows' hidden states travel through the blocks with the calibration
data; what is left is the part after the last block (final norm, LM head). It is run
by the model's own forward with every block replaced by a pass-through and the last
block returning the stored final hidden states, so no architecture-specific code
names the final norm or the head (models differ in both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..models.adapter import adapter_for
from .perplexity import perplexity_from_nll, window_nll


def returns_tuple(output) -> bool:
    """Whether a block returned a tuple (older transformers) rather than a tensor."""
    return isinstance(output, (tuple, list))


@contextlib.contextmanager
def _blocks_replaced(blocks: Sequence[nn.Module], final: list[Tensor], as_tuple: bool) -> Iterator:
    """Every block passes its input through; the last one returns ``final[0]`` instead."""

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def last(*args, **kwargs):
        return (final[0],) if as_tuple else final[0]

    try:
        for block in blocks[:-1]:
            block.forward = passthrough
        blocks[-1].forward = last
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


@torch.no_grad()
def perplexity_after_blocks(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    windows: Tensor,
    finals: Sequence[Tensor],
    batch_size: int,
    prefix_len: int,
    as_tuple: bool,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """``(perplexity, predicted tokens)`` of ``windows`` given the last block's outputs.

    Args:
        windows: ``(n, L)`` token ids, in batches of ``batch_size`` as ``finals``.
        finals: the last block's output hidden states, one tensor per batch.
        as_tuple: whether the model's blocks return tuples (see ``returns_tuple``).

    The modules outside the blocks must be loadable when called (the streaming pipeline
    loads them lazily); the blocks themselves are never run.
    """
    adapter = adapter_for(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    current: list[Tensor] = [torch.empty(0)]
    try:
        with _blocks_replaced(list(blocks), current, as_tuple):
            for batch, hidden in zip(windows.split(batch_size), finals, strict=True):
                ids = batch.to(device)
                current[0] = hidden.to(device)
                inputs = adapter.inputs(ids, attention_mask=torch.ones_like(ids), use_cache=False)
                logits = model(**inputs).logits
                for row_logits, row_ids in zip(logits, ids, strict=True):
                    window, n = window_nll(row_logits, row_ids, prefix_len)
                    nll += window
                    count += n
    finally:
        model.train(was_training)
    return perplexity_from_nll(nll, count), count
