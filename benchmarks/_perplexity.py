"""Held-out perplexity of one model on several texts, for the benchmark scripts."""

from __future__ import annotations

from rankcut.evaluate import perplexity


def perplexities(model, tokenizer, texts: dict[str, str], tokens: int, seq_len: int) -> dict:
    """``{name: perplexity}`` of ``model`` on each text (``tokens`` tokens in windows of
    ``seq_len``), without progress bars."""
    return {
        name: perplexity(model, tokenizer, text, tokens, seq_len, progress=False)["perplexity"]
        for name, text in texts.items()
    }
