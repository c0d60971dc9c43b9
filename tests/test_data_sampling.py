"""The one sampling loop: calibration draws stay what ``generate`` drew, both entry
points agree with it, and no end-of-text token is ever drawn."""

from __future__ import annotations

import pytest
import torch

from rankcut.data.distill import sample_distill_windows
from rankcut.data.generated import generated_windows, windows_from_spec
from rankcut.data.recovery import recovery_windows
from rankcut.data.sampling import (
    DRAWS,
    MAX_SAMPLING_BATCH,
    forbidden_tokens,
    sample,
    sampling_batch,
    start_tokens,
)
from rankcut.errors import RankcutError

from .conftest import tiny_llama


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Windows sampled here are cached in a folder of the test's own, not the user's."""
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))


@torch.no_grad()
def generate_reference(model, tokenizer, samples, seq_len, seed, batch_size, temperature=1.0):
    """The calibration sampler before the one loop: transformers' ``generate``, seeded
    through the global RNG."""
    start = start_tokens(tokenizer)
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for first in range(0, samples, batch_size):
            ids = torch.tensor([start] * min(batch_size, samples - first))
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len - len(start),
                min_new_tokens=seq_len - len(start),
                pad_token_id=start[-1],
            )
            rows.append(out[:, :seq_len])
    return torch.cat(rows)


@pytest.mark.parametrize(
    ("seed", "samples", "batch_size", "temperature"),
    [(0, 5, 2, 1.0), (3, 9, 8, 1.0), (1, 4, 4, 0.7)],
)
def test_calibration_windows_are_what_generate_drew(
    tiny_tokenizer, seed, samples, batch_size, temperature
):
    """Same seed, same windows as the ``generate`` sampler this loop replaced (the
    default recipe's results were measured on those)."""
    model = tiny_llama(len(tiny_tokenizer))
    assert forbidden_tokens(model, tiny_tokenizer) == [tiny_tokenizer.eos_token_id]
    ours = generated_windows(
        model,
        tiny_tokenizer,
        samples,
        24,
        seed,
        batch_size=batch_size,
        temperature=temperature,
        progress=False,
    )
    theirs = generate_reference(model, tiny_tokenizer, samples, 24, seed, batch_size, temperature)
    assert torch.equal(ours, theirs)


def test_entry_points_agree_with_the_loop(tiny_tokenizer):
    """Calibration specs, calibration windows and recovery windows are the one loop with
    its two draw rules; recovery draws with seed + 1."""
    model = tiny_llama(len(tiny_tokenizer))
    loop = torch.cat(
        [
            ids
            for ids, _ in sample(
                model, tiny_tokenizer, 6, 16, 2, batch_size=8, draw="multinomial", progress=False
            )
        ]
    )
    calib = generated_windows(model, tiny_tokenizer, 6, 16, 2, progress=False)
    spec = windows_from_spec("generated", tiny_tokenizer, 6, 16, 2, model=model, progress=False)
    assert torch.equal(loop, calib) and torch.equal(loop, spec)

    loop = torch.cat(
        [
            ids
            for ids, _ in sample(
                model, tiny_tokenizer, 4, 16, 3, batch_size=2, draw="inverse-cdf", progress=False
            )
        ]
    )
    distill = sample_distill_windows(model, tiny_tokenizer, 4, 16, 3, batch_size=2, progress=False)
    assert torch.equal(loop, distill.ids)
    recovery = recovery_windows(
        "generated", tiny_tokenizer, 4, 16, seed=2, model=model, progress=False
    )
    assert torch.equal(
        recovery.ids,
        sample_distill_windows(model, tiny_tokenizer, 4, 16, 3, progress=False).ids,
    )


@pytest.mark.parametrize("draw", sorted(DRAWS))
def test_no_end_of_text_token_is_ever_drawn(tiny_tokenizer, draw):
    """A model that would mostly end the text: neither its generation EOS ids nor the
    tokenizer's EOS id are drawn, by either rule."""
    model = tiny_llama(len(tiny_tokenizer))
    model.generation_config.eos_token_id = [5, 9999]  # one beyond the vocabulary
    eos = [5, tiny_tokenizer.eos_token_id]
    assert forbidden_tokens(model, tiny_tokenizer) == sorted([*eos, 9999])
    bias = torch.zeros(len(tiny_tokenizer))
    bias[eos] = 6.0  # most of the mass, yet never drawn
    model.lm_head.register_forward_hook(lambda mod, args, out: out + bias)
    batches = sample(model, tiny_tokenizer, 16, 24, batch_size=8, draw=draw, progress=False)
    ids = torch.cat([ids for ids, _ in batches])
    assert ids.shape == (16, 24)
    assert not torch.isin(ids, torch.tensor(eos)).any()


def test_keep_sees_every_forward_pass(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    start = len(start_tokens(tiny_tokenizer))
    batches = sample(
        model,
        tiny_tokenizer,
        3,
        10,
        batch_size=2,
        keep=lambda logits: logits.shape,
        progress=False,
    )
    vocab = len(tiny_tokenizer)
    assert [len(ids) for ids, _ in batches] == [2, 1]
    for ids, kept in batches:
        n = len(ids)
        assert kept == [(n, start, vocab)] + [(n, 1, vocab)] * (10 - start - 1)


def test_sample_checks_its_arguments(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    with pytest.raises(RankcutError, match="unknown draw rule"):
        sample(model, tiny_tokenizer, 2, 8, draw="greedy", progress=False)
    with pytest.raises(RankcutError, match="temperature > 0"):
        sample(model, tiny_tokenizer, 2, 8, temperature=0.0, progress=False)
    with pytest.raises(RankcutError, match="seq-len >= 2"):
        sample(model, tiny_tokenizer, 2, 1, progress=False)


def test_sampling_batch_keeps_the_cache_within_budget():
    model = tiny_llama()  # 2 layers, 2 kv heads of 16 dims, float32: 512 bytes per token
    assert sampling_batch(model, 100, budget=512 * 100 * 3) == 3
    assert sampling_batch(model, 100, budget=10) == 1
    assert sampling_batch(model, 100) == MAX_SAMPLING_BATCH


@pytest.mark.slow
def test_smollm2_calibration_windows_are_what_generate_drew():
    import rankcut

    tok = rankcut.load_tokenizer("smollm2-135m")
    model = rankcut.load("smollm2-135m")
    ours = generated_windows(model, tok, 3, 48, 0, batch_size=2, progress=False)
    assert torch.equal(ours, generate_reference(model, tok, 3, 48, 0, 2))


def test_batches_sampled_together_are_the_batches_one_by_one(tiny_tokenizer, monkeypatch):
    """Several batches in one forward pass per token, each with its generator replayed
    to where it would be: the windows of sampling them one after another."""
    import rankcut.data.sampling as sampling

    model = tiny_llama(len(tiny_tokenizer))
    shared = []
    together = sampling._Sampler.together

    def spy(self, start, sizes, seq_len, bar):
        shared.append(list(sizes))
        return together(self, start, sizes, seq_len, bar)

    monkeypatch.setattr(sampling._Sampler, "together", spy)
    # (batches of 4 give this tiny model's rows the same logits in a batch of 8 or 12;
    # batches of 2 do not, and are then sampled one by one)
    ids = generated_windows(model, tiny_tokenizer, 12, 20, 4, batch_size=4, progress=False)
    # one pass for all where the batch invariance check passed; on a BLAS that gives a
    # row of a batch of 12 other bits than in a batch of 4 (an AMX Xeon does), none
    assert shared in ([[4, 4, 4]], [])
    invariant = bool(shared)
    monkeypatch.setattr(sampling, "sampling_batch", lambda model, seq_len: 4)
    one_by_one = generated_windows(model, tiny_tokenizer, 12, 20, 4, batch_size=4, progress=False)
    assert torch.equal(ids, one_by_one)
    if not invariant:
        pytest.skip("this BLAS is not batch invariant here: the batches were drawn one by one")
    assert shared == [[4, 4, 4]]
    # the generator moves on after batches drawn together as after batches one by one
    monkeypatch.setattr(sampling, "sampling_batch", lambda model, seq_len: 8)
    pairs = generated_windows(model, tiny_tokenizer, 12, 20, 4, batch_size=4, progress=False)
    assert shared[1:] == [[4, 4]] and torch.equal(ids, pairs)
