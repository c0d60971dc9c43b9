"""A language model that is no transformers model, and the adapter that describes it.

Its blocks sit in an ``nn.Sequential`` (no ``nn.ModuleList``, no ``_no_split_modules``,
so the default discovery finds none) and its forward takes ``tokens=`` and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rankcut.models import ModelAdapter


class Block(nn.Module):
    """Pre-norm residual block: a causal running mean of the tokens, then an MLP."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        x = x + self.mix(y.cumsum(1) / steps)
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TokenLM(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32, hidden: int = 96, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(*[Block(width, hidden) for _ in range(depth)])
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(self.body(self.embed(tokens)))


class TokenLMAdapter(ModelAdapter):
    """The one small class a family that ``_no_split_modules`` does not describe needs."""

    input_name = "tokens"

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"body.{i}", block) for i, block in enumerate(self.model.body)]

    def embeddings(self) -> list[tuple[str, nn.Module]]:
        return [("embed", self.model.embed)]

    def head(self) -> tuple[str, nn.Module] | None:
        return ("out", self.model.out)


def token_lm(seed: int = 0, **sizes) -> TokenLM:
    torch.manual_seed(seed)
    return TokenLM(**sizes).eval()
