"""Recovery windows that carry the teacher's top-k targets: sampling, targets, sparse KL."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rankcut
from rankcut.data.distill import (
    DistillWindows,
    sample_distill_windows,
    sparse_kl,
    teacher_targets,
    top_targets,
)
from rankcut.data.recovery import recovery_windows
from rankcut.data.sampling import start_tokens
from rankcut.errors import ConfigError, RankcutError
from rankcut.finetune import RecoveryConfig, recover

from .conftest import tiny_bert, tiny_llama


def full_kl(student_logits, teacher_logits):
    t = torch.log_softmax(teacher_logits, -1)
    s = torch.log_softmax(student_logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_sampled_windows_shape_seed_and_start(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    state = torch.random.get_rng_state()
    a = sample_distill_windows(
        model, tiny_tokenizer, 5, 12, seed=3, batch_size=2, top_k=7, progress=False
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = sample_distill_windows(
        model, tiny_tokenizer, 5, 12, seed=3, batch_size=2, top_k=7, progress=False
    )
    c = sample_distill_windows(
        model, tiny_tokenizer, 5, 12, seed=4, batch_size=2, top_k=7, progress=False
    )
    assert a.ids.shape == (5, 12) and a.top_logprobs.shape == (5, 11, 7) == a.top_ids.shape
    assert a.top_logprobs.dtype == torch.float16 and a.top_ids.dtype == torch.int32
    assert (
        torch.equal(a.ids, b.ids)
        and torch.equal(a.top_ids, b.top_ids)
        and not torch.equal(a.ids, c.ids)
    )
    start = start_tokens(tiny_tokenizer)
    assert (a.ids[:, : len(start)] == torch.tensor(start)).all()
    assert not (a.ids[:, len(start) :] == tiny_tokenizer.eos_token_id).any()


def test_targets_taken_while_sampling_equal_a_teacher_pass(tiny_tokenizer):
    """The targets stored with the key/value cache are the teacher's distribution at the
    right positions: the same as one full forward pass over the finished windows."""
    model = tiny_llama(len(tiny_tokenizer))
    sampled = sample_distill_windows(model, tiny_tokenizer, 3, 20, top_k=5, progress=False)
    again = teacher_targets(model, sampled.ids, top_k=5, progress=False)
    assert torch.equal(sampled.top_ids, again.top_ids)
    torch.testing.assert_close(sampled.top_logprobs, again.top_logprobs, atol=2e-3, rtol=0)


def test_sampling_draws_from_the_model_distribution(tiny_tokenizer):
    """The first sampled token follows softmax(logits) (the exponential race is exact)."""
    model = tiny_llama(len(tiny_tokenizer), seed=1)
    start = start_tokens(tiny_tokenizer)
    n = 4000
    out = sample_distill_windows(
        model, tiny_tokenizer, n, len(start) + 1, batch_size=n, top_k=1, progress=False
    )
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([start])).logits[0, -1]
    logits[tiny_tokenizer.eos_token_id] = float("-inf")
    probs = torch.softmax(logits, -1)
    top = probs.topk(3)
    for p, token in zip(top.values, top.indices, strict=True):
        freq = float((out.ids[:, -1] == token).float().mean())
        assert abs(freq - float(p)) < 4 * (float(p) * (1 - float(p)) / n) ** 0.5 + 1e-3


def test_sampling_needs_a_causal_lm(tiny_tokenizer):
    with pytest.raises(RankcutError, match="causal LM"):
        sample_distill_windows(tiny_bert(len(tiny_tokenizer)), tiny_tokenizer, 2, 8, progress=False)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 11), scale=st.floats(0.1, 4.0))
def test_sparse_kl_is_the_coarsened_kl(seed, k, scale):
    """k = vocab gives the full KL; fewer tokens give a lower bound >= 0; equal models 0."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3, 4, 11, generator=g) * scale
    student = teacher + torch.randn(3, 4, 11, generator=g)
    exact = torch.log_softmax(teacher, -1)
    full = full_kl(student, teacher)
    lp, ids = exact.topk(11)
    assert sparse_kl(student, lp, ids) == pytest.approx(full, rel=1e-4, abs=1e-6)
    lp, ids = exact.topk(k)
    part = float(sparse_kl(student, lp, ids))
    assert -1e-6 <= part <= full + 1e-6
    # k = 1 is the KL between the Bernoulli "top token or not" of the two models.
    p, q = lp[..., 0].exp(), torch.log_softmax(student, -1).gather(-1, ids[..., :1])[..., 0].exp()
    bernoulli = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert float(sparse_kl(student, lp[..., :1], ids[..., :1])) == pytest.approx(
        float(bernoulli.mean()), rel=1e-3, abs=1e-6
    )
    lp, ids = top_targets(teacher, k)  # the stored float16 form
    assert abs(float(sparse_kl(teacher, lp, ids))) < 5e-3  # fp16 targets


def test_distill_windows_check_shapes():
    with pytest.raises(RankcutError, match="do not fit"):
        DistillWindows(
            torch.zeros(2, 8, dtype=torch.long),
            torch.zeros(2, 8, 3),
            torch.zeros(2, 8, 3, dtype=torch.int32),
        )


def test_recovery_on_stored_targets_needs_no_teacher(tiny_tokenizer):
    teacher = tiny_llama(len(tiny_tokenizer))
    model = copy.deepcopy(teacher)
    rankcut.compress(model, rankcut.SvdConfig(ratio=0.6), progress=False)
    data = recovery_windows(
        "generated", tiny_tokenizer, 30, 24, model=teacher, count=6, progress=False
    )
    assert isinstance(data, DistillWindows) and len(data) == 6
    with torch.no_grad():
        before = full_kl(model(input_ids=data.ids).logits, teacher(input_ids=data.ids).logits)
    recover(model, data, RecoveryConfig(steps=30, lr=3e-3, warmup=2), progress=False)
    with torch.no_grad():
        after = full_kl(model(input_ids=data.ids).logits, teacher(input_ids=data.ids).logits)
    assert after < 0.7 * before
    with pytest.raises(ConfigError, match="temperature"):
        recover(model, data, RecoveryConfig(steps=1, temperature=2.0), progress=False)


def test_mixed_recovery_spec_gives_text_windows_teacher_targets(tiny_tokenizer, calib_file):
    teacher = tiny_llama(len(tiny_tokenizer))
    data = recovery_windows(
        f"{calib_file}+generated", tiny_tokenizer, 5, 16, model=teacher, count=5, progress=False
    )
    assert isinstance(data, DistillWindows) and data.ids.shape == (5, 16)
    text = teacher_targets(teacher, data.ids[:3], progress=False)
    assert torch.equal(text.top_ids, data.top_ids[:3])
