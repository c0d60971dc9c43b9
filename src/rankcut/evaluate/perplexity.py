"""Perplexity of a causal LM on held-out text.

Protocol: the first ``tokens`` tokens of the text (tokenized without special tokens),
cut into consecutive non-overlapping windows of ``seq_len`` tokens (a shorter tail is
dropped); a window is prefixed with BOS only when the tokenizer adds one by default;
each window is scored independently; the result is ``exp(mean next-token NLL)`` over
every predicted text token, computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import bos_prefix, evaluation_windows
from ..errors import RankcutError
from ..models.adapter import adapter_for
from ..models.kind import is_causal_lm
from ..models.structure import model_device


def window_nll(logits: Tensor, ids: Tensor, prefix_len: int = 0) -> tuple[float, int]:
    """``(summed next-token NLL, predicted tokens)`` of one window's ``(L, vocab)`` logits.

    ``logits[t]`` predicts ``ids[t+1]``; the first ``prefix_len`` positions (a BOS) are
    context only and never predicted. Computed in float32.
    """
    start = max(prefix_len - 1, 0)
    pred = logits[start:-1].float()
    target = ids[start + 1 :].to(pred.device)
    return float(F.cross_entropy(pred, target, reduction="sum")), int(target.numel())


def perplexity_from_nll(nll: float, count: int) -> float:
    """``exp(nll / count)``, or a clear error when the model produced NaN or inf."""
    if not math.isfinite(nll):
        raise RankcutError("the loss is not finite: the model produces NaN or inf")
    return math.exp(nll / count)


@torch.no_grad()
def perplexity_of_windows(
    model: nn.Module, windows: Tensor, prefix_len: int = 0, progress: bool = True
) -> tuple[float, int]:
    """``(perplexity, predicted_tokens)`` over ``(n, L)`` token windows.

    The first ``prefix_len`` positions (a BOS) are context only and never predicted.
    """
    device = model_device(model)
    adapter = adapter_for(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for row in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        ids = row[None].to(device)
        out = model(**adapter.inputs(ids, attention_mask=torch.ones_like(ids)))
        logits = getattr(out, "logits", None)
        if logits is None:
            raise RankcutError("perplexity needs a causal LM (the model returned no logits)")
        window, n = window_nll(logits[0], ids[0], prefix_len)
        nll += window
        count += n
    model.train(was_training)
    return perplexity_from_nll(nll, count), count


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    tokens: int = 4096,
    seq_len: int = 512,
    progress: bool = True,
) -> dict:
    """Held-out perplexity following the module's protocol.

    Returns:
        ``{"perplexity", "tokens" (predicted), "windows", "seq_len", "bos"}``.

    Example:
        >>> import rankcut  # doctest: +SKIP
        >>> m = rankcut.load("smollm2-135m"); tok = rankcut.load_tokenizer("smollm2-135m")
        >>> rankcut.evaluate.perplexity(m, tok, "some held-out text ...", tokens=1024)
    """
    # A model that cannot say (not a transformers model) is given the benefit of the doubt.
    if hasattr(model, "can_generate") and not is_causal_lm(model):
        raise RankcutError(
            f"perplexity needs a causal LM; {type(model).__name__} is not one "
            "(encoders have no next-token predictions)"
        )
    windows = evaluation_windows(text, tokenizer, tokens, seq_len)
    prefix = len(bos_prefix(tokenizer))
    ppl, count = perplexity_of_windows(model, windows, prefix, progress=progress)
    return {
        "perplexity": ppl,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seq_len": seq_len,
        "bos": bool(prefix),
    }
