"""The cache of model-generated calibration windows: a second run reads what the first
sampled, the content is what a fresh sampling gives, and nothing it cannot vouch for is
ever served (other weights, seed, count, hooks, a corrupt file)."""

from __future__ import annotations

import logging

import pytest
import torch

import rankcut.data.generated as generated
from rankcut.data.generated import (
    CACHE_ENV,
    cached_generated_windows,
    calibration_cache_dir,
    generated_windows,
    windows_cache_key,
    windows_from_spec,
)
from rankcut.data.sampling import start_tokens

from .conftest import tiny_llama


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets an empty cache folder of its own, with the cache switched on."""
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return tmp_path / "cache" / "calibration"


def _no_sampling(*args, **kwargs):
    raise AssertionError("sampled although the cache holds these windows")


def test_second_run_reads_the_cache_and_equals_a_fresh_sampling(
    tiny_tokenizer, monkeypatch, caplog
):
    model = tiny_llama(len(tiny_tokenizer))
    fresh = generated_windows(model, tiny_tokenizer, 5, 16, 3, progress=False)
    with caplog.at_level(logging.INFO, logger="rankcut"):
        first = windows_from_spec("generated", tiny_tokenizer, 5, 16, 3, model=model)
    assert torch.equal(first, fresh)
    files = list(calibration_cache_dir().glob("*.safetensors"))
    assert len(files) == 1 and "5 sampled, cached in" in caplog.text
    caplog.clear()
    monkeypatch.setattr(generated, "generated_windows", _no_sampling)
    with caplog.at_level(logging.INFO, logger="rankcut"):
        second = windows_from_spec("generated", tiny_tokenizer, 5, 16, 3, model=model)
    assert torch.equal(second, fresh)
    assert f"calibration windows: 5 reused from cache {files[0]}" in caplog.text


def test_mixed_spec_reuses_its_generated_half(tiny_tokenizer, calib_file, monkeypatch):
    model = tiny_llama(len(tiny_tokenizer))
    spec = f"{calib_file}+generated"
    first = windows_from_spec(spec, tiny_tokenizer, 6, 16, model=model, progress=False)
    monkeypatch.setattr(generated, "generated_windows", _no_sampling)
    second = windows_from_spec(spec, tiny_tokenizer, 6, 16, model=model, progress=False)
    assert torch.equal(first, second)


def test_the_key_follows_everything_the_windows_depend_on(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    key = windows_cache_key(model, tiny_tokenizer, 4, 16, 0)
    assert key == windows_cache_key(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, 4, 16, 0)
    others = {
        windows_cache_key(tiny_llama(len(tiny_tokenizer), seed=1), tiny_tokenizer, 4, 16, 0),
        windows_cache_key(model, tiny_tokenizer, 4, 16, 1),
        windows_cache_key(model, tiny_tokenizer, 5, 16, 0),
        windows_cache_key(model, tiny_tokenizer, 4, 17, 0),
        windows_cache_key(model, tiny_tokenizer, 4, 16, 0, batch_size=2),
        windows_cache_key(model, tiny_tokenizer, 4, 16, 0, temperature=0.7),
        windows_cache_key(
            tiny_llama(len(tiny_tokenizer), rms_norm_eps=1e-3), tiny_tokenizer, 4, 16
        ),
    }
    model.generation_config.eos_token_id = 5  # an end-of-text id never drawn
    others.add(windows_cache_key(model, tiny_tokenizer, 4, 16, 0))
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-6  # one weight, in place
    others.add(windows_cache_key(model, tiny_tokenizer, 4, 16, 0))
    assert key not in others and len(others) == 9


def test_changed_weights_are_sampled_again(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    before = windows_from_spec("generated", tiny_tokenizer, 4, 16, model=model, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    after = windows_from_spec("generated", tiny_tokenizer, 4, 16, model=model, progress=False)
    assert torch.equal(after, generated_windows(model, tiny_tokenizer, 4, 16, progress=False))
    assert not torch.equal(before, after)
    assert len(list(calibration_cache_dir().glob("*.safetensors"))) == 2


def test_a_hooked_model_is_never_served_from_the_cache(tiny_tokenizer, cache):
    """Hooks change what the model computes without changing its weights."""
    model = tiny_llama(len(tiny_tokenizer))
    windows_from_spec("generated", tiny_tokenizer, 2, 6, model=model, progress=False)
    favour = torch.nn.functional.one_hot(torch.tensor(7), len(tiny_tokenizer)) * 1e4
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: out + favour)
    assert windows_cache_key(model, tiny_tokenizer, 2, 6) is None
    out = windows_from_spec("generated", tiny_tokenizer, 2, 6, model=model, progress=False)
    assert (out[:, len(start_tokens(tiny_tokenizer)) :] == 7).all()
    handle.remove()
    assert len(list(cache.glob("*.safetensors"))) == 1


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", "wrong windows"])
def test_a_corrupt_file_is_ignored_and_rewritten(tiny_tokenizer, content, caplog):
    model = tiny_llama(len(tiny_tokenizer))
    key = windows_cache_key(model, tiny_tokenizer, 3, 12, 0)
    path = calibration_cache_dir() / f"{key}.safetensors"
    path.parent.mkdir(parents=True)
    if content == "wrong windows":  # readable, but not what was asked for
        from safetensors.torch import save_file

        save_file({"ids": torch.zeros(2, 12, dtype=torch.long)}, str(path))
    else:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="rankcut"):
        out = cached_generated_windows(model, tiny_tokenizer, 3, 12, 0, progress=False)
    assert "ignoring" in caplog.text
    fresh = generated_windows(model, tiny_tokenizer, 3, 12, 0, progress=False)
    assert torch.equal(out, fresh)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["ids"], fresh)  # rewritten


@pytest.mark.parametrize("switch", ["env", "argument"])
def test_the_cache_can_be_switched_off(tiny_tokenizer, monkeypatch, cache, switch):
    model = tiny_llama(len(tiny_tokenizer))
    if switch == "env":
        monkeypatch.setenv(CACHE_ENV, "0")
    options = {"cache": False} if switch == "argument" else {}
    out = windows_from_spec(
        "generated", tiny_tokenizer, 2, 8, model=model, progress=False, **options
    )
    assert torch.equal(out, generated_windows(model, tiny_tokenizer, 2, 8, progress=False))
    assert not cache.exists()


def test_an_unwritable_cache_is_no_error(tiny_tokenizer, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("RANKCUT_CACHE", str(blocker))
    model = tiny_llama(len(tiny_tokenizer))
    with caplog.at_level(logging.WARNING, logger="rankcut"):
        out = windows_from_spec("generated", tiny_tokenizer, 2, 8, model=model, progress=False)
    assert torch.equal(out, generated_windows(model, tiny_tokenizer, 2, 8, progress=False))
    assert "could not cache" in caplog.text


def test_text_tokens_are_read_back_and_equal_a_fresh_tokenization(
    tiny_tokenizer, calib_file, monkeypatch
):
    import rankcut.data.windows as windows

    tokenize = windows.tokenize
    monkeypatch.setenv(CACHE_ENV, "0")
    fresh = windows_from_spec(str(calib_file), tiny_tokenizer, 4, 16, 2)
    assert not calibration_cache_dir().exists()
    monkeypatch.delenv(CACHE_ENV)
    first = windows_from_spec(str(calib_file), tiny_tokenizer, 4, 16, 2)
    (path,) = calibration_cache_dir().glob("tokens-*.safetensors")
    monkeypatch.setattr(windows, "tokenize", _no_sampling)
    second = windows_from_spec(str(calib_file), tiny_tokenizer, 4, 16, 2)
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    other_text = calib_file.read_text() + "One more line.\n"
    with pytest.raises(AssertionError, match="sampled"):  # another text is tokenized anew
        windows.calibration_windows(other_text, tiny_tokenizer, 4, 16, 2)
    monkeypatch.setattr(windows, "tokenize", tokenize)
    path.write_bytes(b"corrupt")  # tokenized again and rewritten, never an error
    assert torch.equal(windows_from_spec(str(calib_file), tiny_tokenizer, 4, 16, 2), fresh)
    from safetensors.torch import load_file

    assert load_file(str(path))["ids"].numel() > 0
