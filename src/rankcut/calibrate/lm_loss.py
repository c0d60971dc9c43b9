"""The gradient of a causal LM's mean next-token cross-entropy, row chunk by row chunk.

``model(ids, labels=ids).loss`` followed by a backward materializes, besides the logits,
their log-softmax, a zero-filled gradient for it and the log-softmax's gradient: four
``tokens x vocabulary`` float32 tensors (400 MB each for 2048 tokens of a 49k
vocabulary), each faulted in afresh. The gradient itself is known in closed form,

    dL/dz_t = (softmax(z_t) - e_{y_t}) / N   for each of the N positions with a label,

and zero elsewhere, where ``y_t`` is the token after position ``t`` (the label shifted
left, as transformers' ``ForCausalLMLoss`` does). This module computes it a few rows at
a time into one buffer (possibly the logits themselves), so a pass that needs only the
gradient (``calibrate.collect``'s Fisher passes) touches one such tensor instead of four.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Label value left out of the loss (transformers' ``ForCausalLMLoss``, torch's default).
IGNORE_INDEX = -100
#: Logit elements per chunk (float32: 16 MB, below glibc's largest mmap threshold, so
#: the chunk's temporaries are reused from the heap).
CHUNK_ELEMENTS = 1 << 22


def shifted_targets(labels: Tensor) -> Tensor:
    """The label each position is scored on: ``labels[:, t + 1]``, ``IGNORE_INDEX`` last."""
    pad = labels.new_full((*labels.shape[:-1], 1), IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def next_token_loss_grad(
    logits: Tensor, labels: Tensor, scale: float = 1.0, out: Tensor | None = None
) -> Tensor:
    """``scale * dL/dlogits`` of ``L``, the mean next-token cross-entropy of ``logits``.

    Args:
        logits: ``(..., T, V)`` scores of a causal LM (any float dtype; computed in
            float32, as ``ForCausalLMLoss`` upcasts).
        labels: ``(..., T)`` token ids; ``IGNORE_INDEX`` marks positions left out.
        scale: factor applied to the gradient (e.g. the batch size, to put each
            window's gradient at the scale of its own loss).
        out: where to write it, contiguous, shaped and typed like ``logits``; may be
            ``logits`` itself (overwritten row chunk by row chunk). A new contiguous
            tensor by default (``logits`` need not be contiguous).

    Returns:
        ``out``, holding the gradient.

    Raises:
        ValueError: on mismatched shapes or when no position has a label.

    Example:
        >>> z = torch.randn(2, 5, 7, requires_grad=True); y = torch.randint(0, 7, (2, 5))
        >>> loss = torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, 7), y[:, 1:].reshape(-1))
        >>> torch.allclose(next_token_loss_grad(z.detach(), y), torch.autograd.grad(loss, z)[0])
        True
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or not out.is_contiguous():
        raise ValueError(
            f"out {tuple(out.shape)} must be contiguous and match logits {tuple(logits.shape)}"
        )
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)
    g = out.view(-1, vocab)
    targets = shifted_targets(labels).reshape(-1).to(logits.device)
    valid = targets != IGNORE_INDEX
    count = int(valid.sum())
    if count == 0:
        raise ValueError("no position has a next-token label to take a loss on")
    factor = scale / count
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, z.shape[0], rows):
        stop = min(start + rows, z.shape[0])
        p = torch.softmax(z[start:stop].float(), dim=-1)
        keep = valid[start:stop]
        t = targets[start:stop]
        index = keep.nonzero().squeeze(1)
        p[index, t[index]] -= 1.0
        p.mul_(factor)
        p[~keep] = 0.0
        g[start:stop] = p
    return out
