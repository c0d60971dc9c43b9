"""Calibration statistics and block capture, on HF models and on a model that is no
transformers model (through its adapter)."""

from __future__ import annotations

import pytest
import torch

from rankcut.calibrate import HookManager, collect_input_stats
from rankcut.calibrate.sensitivity import mean_loss
from rankcut.calibrate.sequential import SpilledTensors, capture_block_inputs, run_block
from rankcut.errors import RankcutError
from rankcut.models import find_decoder_layers, find_targets, register_adapter, unregister_adapter

from .conftest import tiny_llama
from .custom_lm import TokenLM, TokenLMAdapter, token_lm


@pytest.fixture
def token_lm_adapter():
    register_adapter(TokenLM)(TokenLMAdapter)
    yield TokenLMAdapter
    unregister_adapter(TokenLMAdapter)


def test_spilled_tensors_round_trip_and_clear(tmp_path):
    tensors = [torch.randn(3, 4) for _ in range(4)]
    kept = SpilledTensors(tmp_path / "s", limit_bytes=2 * 3 * 4 * 4)  # two fit in memory
    in_memory = SpilledTensors()
    for t in tensors:
        kept.append(t)
        in_memory.append(t)
    assert len(kept) == 4 and len(list((tmp_path / "s").glob("*.safetensors"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(kept, tensors, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(in_memory, tensors, strict=True))
    kept.clear()
    assert len(kept) == 0 and not list((tmp_path / "s").glob("*"))


def test_gram_of_a_custom_model_is_the_gram_of_its_inputs(token_lm_adapter):
    """Calibration runs a ``tokens=`` forward (no attention mask, no cache flag) and the
    statistics are those of the inputs the layers really saw."""
    model = token_lm()
    windows = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(0))
    modules = find_targets(model)
    seen = {}
    with HookManager() as hooks:
        for name, module in modules.items():
            hooks.forward(
                module, lambda m, args, out, n=name: seen.setdefault(n, []).append(args[0])
            )
        with torch.no_grad():
            model(tokens=windows)
    stats = collect_input_stats(model, modules, windows, batch_size=2, progress=False)
    for name in ("body.0.mix", "body.2.down"):
        x = torch.cat(seen[name]).reshape(-1, modules[name].in_features).double()
        torch.testing.assert_close(stats[name].gram, x.T @ x, rtol=1e-5, atol=1e-5)
        assert stats[name].tokens == windows.numel()


def test_captured_block_inputs_replay_the_model(token_lm_adapter):
    model = token_lm()
    windows = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    blocks = find_decoder_layers(model)
    captured = capture_block_inputs(model, blocks[0][1], windows, batch_size=3)
    assert [len(c.hidden) for c in captured] == [3, 1]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([c.hidden for c in captured]), model.embed(windows))
        hidden = [c.hidden for c in captured]
        for _, block in blocks:
            hidden = [
                run_block(block, c.with_hidden(h)) for c, h in zip(captured, hidden, strict=True)
            ]
        torch.testing.assert_close(model.out(torch.cat(hidden)), model(tokens=windows))


def test_mean_loss_is_the_models_own_loss():
    model = tiny_llama()
    windows = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = float(model(input_ids=windows, labels=windows).loss)
    assert mean_loss(model, windows) == pytest.approx(want, rel=1e-6)


def test_mean_loss_needs_a_loss(token_lm_adapter):
    """A forward that takes no ``labels`` is not handed any, and its missing loss is
    reported as such (not as an unexpected keyword argument)."""
    with pytest.raises(RankcutError, match="language-modeling loss"):
        mean_loss(token_lm(), torch.zeros(1, 8, dtype=torch.long))
