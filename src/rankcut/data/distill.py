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
from ..models.adapter import adapter_for
from ..models.structure import model_device
from .sampling import sample

#: Teacher tokens kept per position: the tail beyond them enters the loss as one bucket.
DISTILL_TOP_K = 64


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


@torch.no_grad()
def sample_distill_windows(
    model: nn.Module,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    top_k: int = DISTILL_TOP_K,
    **options,
) -> DistillWindows:
    """``samples`` windows sampled from ``model`` (a causal LM), with its top-``k`` targets.

    ``options`` are ``sampling.sample``'s (``batch_size``, ``temperature``,
    ``progress``).

    The sampling loop of ``sampling.sample`` (key/value cache, ``batch_size`` sequences
    at once, default ``sampling_batch``; a private seeded generator; end-of-text tokens
    never drawn) with its inverse-CDF draw. The targets are the model's own distribution
    at temperature 1 (what distillation matches), taken from the same forward passes
    that sampled the text.

    Example:
        >>> data = sample_distill_windows(dense, tokenizer, 128, 512)  # doctest: +SKIP
    """
    if top_k < 1:
        raise RankcutError(f"need top-k >= 1, got {top_k}")
    batches = sample(
        model,
        tokenizer,
        samples,
        seq_len,
        seed,
        draw="inverse-cdf",
        keep=lambda logits: top_targets(logits, top_k),
        desc="sampling recovery windows",
        **options,
    )
    return DistillWindows.cat(
        [
            DistillWindows(
                ids, torch.cat([v for v, _ in kept], 1), torch.cat([i for _, i in kept], 1)
            )
            for ids, kept in batches
        ]
    )


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    windows: Tensor,
    *,
    top_k: int = DISTILL_TOP_K,
    progress: bool = True,
) -> DistillWindows:
    """Top-``k`` targets of ``teacher`` for given token windows, one forward pass each."""
    device = model_device(teacher)
    adapter = adapter_for(teacher)
    was_training = teacher.training
    teacher.eval()
    values, indices = [], []
    try:
        for row in tqdm(windows, desc="teacher targets", disable=not progress):
            out = teacher(**adapter.inputs(row[None].to(device), use_cache=False))
            logits = out.logits[:, :-1]
            v, i = top_targets(logits, top_k)
            values.append(v)
            indices.append(i)
    finally:
        teacher.train(was_training)
    return DistillWindows(windows, torch.cat(values), torch.cat(indices))
