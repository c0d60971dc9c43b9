"""Model-generated calibration windows and mixed calibration specs."""

from __future__ import annotations

import pytest
import torch

from rankcut.data.generated import generated_windows, windows_from_spec
from rankcut.data.sampling import start_tokens
from rankcut.errors import RankcutError

from .conftest import tiny_bert, tiny_llama


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Windows sampled here are cached in a folder of the test's own, not the user's."""
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))


def test_generated_windows_shape_start_and_seed(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    state = torch.random.get_rng_state()
    a = generated_windows(model, tiny_tokenizer, 5, 12, seed=3, batch_size=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = generated_windows(model, tiny_tokenizer, 5, 12, seed=3, batch_size=2, progress=False)
    c = generated_windows(model, tiny_tokenizer, 5, 12, seed=4, batch_size=2, progress=False)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    start = start_tokens(tiny_tokenizer)
    assert (a[:, : len(start)] == torch.tensor(start)).all()
    assert int(a.max()) < len(tiny_tokenizer)


def test_generated_windows_follow_the_model(tiny_tokenizer):
    """A model that always predicts one token generates only that token."""
    model = tiny_llama(len(tiny_tokenizer))
    favour = torch.nn.functional.one_hot(torch.tensor(7), len(tiny_tokenizer)) * 1e4
    model.lm_head.register_forward_hook(lambda mod, args, out: out + favour)
    out = generated_windows(model, tiny_tokenizer, 2, 6, progress=False)
    assert (out[:, len(start_tokens(tiny_tokenizer)) :] == 7).all()


def test_generated_needs_a_causal_lm(tiny_tokenizer):
    with pytest.raises(RankcutError, match="causal LM"):
        generated_windows(tiny_bert(len(tiny_tokenizer)), tiny_tokenizer, 2, 8, progress=False)


def test_mixed_spec_splits_samples(tiny_tokenizer, calib_file):
    model = tiny_llama(len(tiny_tokenizer))
    spec = f"{calib_file}+generated"
    out = windows_from_spec(spec, tiny_tokenizer, 5, 16, model=model, progress=False)
    assert out.shape == (5, 16)
    text_only = windows_from_spec(str(calib_file), tiny_tokenizer, 3, 16)
    assert torch.equal(out[:3], text_only)  # text part first, 3 = 5 // 2 + remainder


@pytest.mark.parametrize(
    ("spec", "match"),
    [("generated", "needs the model"), ("a.txt+", "empty part")],
)
def test_bad_specs(tiny_tokenizer, spec, match):
    with pytest.raises(RankcutError, match=match):
        windows_from_spec(spec, tiny_tokenizer, 4, 16)
