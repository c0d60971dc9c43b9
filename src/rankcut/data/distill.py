"""Training windows that carry the teacher's next-token distribution with them.

A recovery fine-tune distills the dense model (the teacher) into the compressed one. When
its training text is sampled from the teacher, the teacher has already computed its
next-token distribution at every position while sampling; keeping the ``k`` most likely
tokens of each (their log-probabilities and ids) costs a few bytes per token and saves a
teacher forward pass per training step later. Windows of plain text get the same targets
from one teacher pass each, so that training never needs the teacher in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import RankcutError

#: Teacher tokens kept per position: the tail beyond them enters the loss as one bucket.
DISTILL_TOP_K = 64
#: Memory the key/value cache of one sampling batch may take, and the largest batch
#: (on 2 CPU cores SmolLM2-135M samples 19% faster per token at 64 than at 32, and no
#: faster at 128).
SAMPLING_CACHE_BYTES = 2 * 2**30
MAX_SAMPLING_BATCH = 64


def sampling_batch(model: nn.Module, seq_len: int, budget: int = SAMPLING_CACHE_BYTES) -> int:
    """Sequences sampled at once: as many as keep the key/value cache of ``seq_len``
    tokens each within ``budget`` bytes, between 1 and ``MAX_SAMPLING_BATCH``."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return 8  # an architecture whose cache size cannot be read from its config
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    itemsize = next(model.parameters()).element_size()
    per_sequence = 2 * layers * kv_heads * head_dim * itemsize * seq_len
    return max(1, min(MAX_SAMPLING_BATCH, budget // per_sequence))


@dataclass
class DistillWindows:
    """Token windows with the teacher's top-``k`` next-token log-probabilities.

    Attributes:
        ids: ``(n, seq_len)`` token ids.
        top_logprobs: ``(n, seq_len - 1, k)`` teacher log-probabilities (float16) of the
            ``k`` most likely next tokens after each position but the last.
        top_ids: ``(n, seq_len - 1, k)`` the ids of those tokens (int32).
    """

    ids: Tensor
    top_logprobs: Tensor
    top_ids: Tensor

    def __post_init__(self) -> None:
        n, length = self.ids.shape
        if self.top_logprobs.shape[:2] != (n, length - 1) or (
            self.top_ids.shape != self.top_logprobs.shape
        ):
            raise RankcutError(
                f"distillation targets {tuple(self.top_logprobs.shape)} / "
                f"{tuple(self.top_ids.shape)} do not fit windows {tuple(self.ids.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        """The shape of ``ids`` (so that code counting windows needs no special case)."""
        return self.ids.shape

    def __len__(self) -> int:
        return self.ids.shape[0]

    @staticmethod
    def cat(parts: list[DistillWindows]) -> DistillWindows:
        return DistillWindows(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.top_logprobs for p in parts]),
            torch.cat([p.top_ids for p in parts]),
        )


def top_targets(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest next-token log-probabilities of ``logits`` (``(..., vocab)``) and
    their ids, as float16 and int32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return values.to(torch.float16).cpu(), ids.to(torch.int32).cpu()


def sparse_kl(student_logits: Tensor, top_logprobs: Tensor, top_ids: Tensor) -> Tensor:
    """Mean per-position KL(teacher || student) over the teacher's top ``k`` tokens plus
    one bucket for the rest of the vocabulary.

    This is the exact KL divergence between the two distributions coarsened to ``k + 1``
    outcomes (a lower bound of the full KL that equals it when the tail is empty).

    Args:
        student_logits: ``(..., vocab)``.
        top_logprobs: ``(..., k)`` teacher log-probabilities.
        top_ids: ``(..., k)`` their token ids.
    """
    student = torch.log_softmax(student_logits.float(), dim=-1)
    q = student.gather(-1, top_ids.long())
    p = top_logprobs.float()
    # log(1 - sum of the top k), floored where rounding leaves no tail at all
    p_tail = (1 - p.exp().sum(-1)).clamp_min(1e-12).log()
    q_tail = (1 - q.exp().sum(-1)).clamp_min(1e-12).log()
    head = (p.exp() * (p - q)).sum(-1)
    tail = p_tail.exp() * (p_tail - q_tail)
    return (head + tail).mean()


def _forbidden(model: nn.Module, tokenizer) -> list[int]:
    """End-of-text ids that sampling never draws, so every window is full-length text."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


@torch.no_grad()
def sample_distill_windows(
    model: nn.Module,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    top_k: int = DISTILL_TOP_K,
    temperature: float = 1.0,
    progress: bool = True,
) -> DistillWindows:
    """``samples`` windows sampled from ``model`` (a causal LM), with its top-``k`` targets.

    Plain ancestral sampling at ``temperature`` with a key/value cache, ``batch_size``
    sequences at once (default: ``sampling_batch``), seeded by a private generator;
    end-of-text tokens are never drawn. The targets are the model's
    own distribution at temperature 1 (what distillation matches), taken from the same
    forward passes that sampled the text.

    Example:
        >>> data = sample_distill_windows(dense, tokenizer, 128, 512)  # doctest: +SKIP
    """
    from .generated import start_tokens

    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise RankcutError(f"sampling needs a causal LM; {type(model).__name__} cannot generate")
    if samples < 1 or seq_len < 2 or top_k < 1 or temperature <= 0:
        raise RankcutError(
            f"need samples >= 1, seq-len >= 2, top-k >= 1 and temperature > 0; got "
            f"{samples}, {seq_len}, {top_k}, {temperature}"
        )
    start = start_tokens(tokenizer)
    if len(start) >= seq_len:
        raise RankcutError(f"seq-len {seq_len} leaves no room after the start tokens {start}")
    batch_size = batch_size or sampling_batch(model, seq_len)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    forbidden = torch.tensor(_forbidden(model, tokenizer), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    parts = []
    try:
        bar = tqdm(
            total=samples * seq_len,
            desc="sampling recovery windows",
            unit="tok",
            unit_scale=True,
            disable=not progress,
        )
        for first in range(0, samples, batch_size):
            n = min(batch_size, samples - first)
            parts.append(
                _sample_batch(
                    model, start, n, seq_len, temperature, top_k, forbidden, generator, bar
                )
            )
        bar.close()
    finally:
        model.train(was_training)
    return DistillWindows.cat(parts)


def _sample_batch(model, start, n, seq_len, temperature, top_k, forbidden, generator, bar):
    """One batch of ``n`` windows: a prefill of the start tokens, then one cached forward
    pass per new token; the progress ``bar`` counts tokens."""
    ids = torch.tensor([start] * n, device=forbidden.device)
    out = model(input_ids=ids, use_cache=True)
    tokens = [ids.cpu()]
    bar.update(n * len(start))
    values, indices = [], []
    for position in range(len(start), seq_len):
        logits = out.logits
        v, i = top_targets(logits, top_k)
        values.append(v)
        indices.append(i)
        nxt = _draw(logits[:, -1], temperature, forbidden, generator)
        tokens.append(nxt.cpu())
        bar.update(n)
        if position < seq_len - 1:
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return DistillWindows(torch.cat(tokens, 1), torch.cat(values, 1), torch.cat(indices, 1))


def _draw(logits: Tensor, temperature: float, forbidden: Tensor, generator) -> Tensor:
    """One token per row of ``logits`` ``(n, vocab)`` from softmax(logits / temperature),
    never a ``forbidden`` id: inverse-CDF sampling, one uniform number per row (drawing
    a random number per vocabulary entry, as an exponential race does, costs ten times
    more for a large vocabulary)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    forbidden = forbidden[forbidden < probs.shape[1]]  # ids the model's head lacks
    if forbidden.numel():
        probs[:, forbidden] = 0.0
    cdf = probs.cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    # the first index whose cumulative mass exceeds u: token i with probability p_i
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(cdf.shape[1] - 1)


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    windows: Tensor,
    *,
    top_k: int = DISTILL_TOP_K,
    progress: bool = True,
) -> DistillWindows:
    """Top-``k`` targets of ``teacher`` for given token windows, one forward pass each."""
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    values, indices = [], []
    try:
        for row in tqdm(windows, desc="teacher targets", disable=not progress):
            logits = teacher(input_ids=row[None].to(device), use_cache=False).logits[:, :-1]
            v, i = top_targets(logits, top_k)
            values.append(v)
            indices.append(i)
    finally:
        teacher.train(was_training)
    return DistillWindows(windows, torch.cat(values), torch.cat(indices))
