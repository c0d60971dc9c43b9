"""Calibration statistics and block capture, on HF models and on a model that is no
transformers model (through its adapter)."""

from __future__ import annotations

import pytest
import torch

from rankcut.calibrate import HookManager, collect_fisher, collect_input_stats
from rankcut.calibrate.sensitivity import mean_loss
from rankcut.calibrate.sequential import SpilledTensors, capture_block_calls, run_block
from rankcut.decompose import psd_cholesky
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
    ran = {name: 0 for name, _ in blocks}
    for name, block in blocks:
        block.mix.register_forward_hook(lambda *a, name=name: ran.__setitem__(name, ran[name] + 1))
    captured, calls = capture_block_calls(model, [b for _, b in blocks], windows, batch_size=3)
    # the blocks are bypassed: only the first runs, once, to learn what a block returns
    assert list(ran.values()) == [1] + [0] * (len(blocks) - 1)
    assert calls.uniform  # (this model calls every block alike)
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


def test_fisher_matches_autograd_per_sample(windows):
    model = tiny_llama()
    name, lin = next(iter(find_targets(model).items()))
    fisher = collect_fisher(model, {name: lin}, windows[:2], progress=False)[0][name]
    expected = torch.zeros_like(fisher)
    for row in windows[:2]:
        ids = row[None]
        loss = model(input_ids=ids, labels=ids).loss
        (g,) = torch.autograd.grad(loss, lin.weight)
        expected += g.double().pow(2).sum(0)
    torch.testing.assert_close(fisher, expected)
    assert all(p.grad is None for p in model.parameters())


def test_shared_inputs_share_one_gram(windows):
    model = tiny_llama()
    targets = find_targets(model)
    stats = collect_input_stats(model, targets, windows, progress=False)
    layer = "model.layers.0."
    q, k, v = (stats[f"{layer}self_attn.{p}_proj"] for p in "qkv")
    gate, up = stats[f"{layer}mlp.gate_proj"], stats[f"{layer}mlp.up_proj"]
    assert q is k is v and gate is up and q is not gate
    assert stats[f"{layer}self_attn.o_proj"] is not q
    assert q.tokens == windows.numel()


def test_gram_equals_explicit_inputs(windows):
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    seen = []
    handle = lin.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    stats = collect_input_stats(model, {name: lin}, windows, progress=False)[name]
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    torch.testing.assert_close(stats.gram, x.T @ x, rtol=1e-5, atol=1e-6)
    assert not lin._forward_hooks


def test_hooks_removed_after_error(windows):
    model = tiny_llama()
    targets = find_targets(model)
    with pytest.raises(IndexError):  # token ids beyond the vocabulary fail mid-forward
        collect_input_stats(model, targets, windows + 10_000, progress=False)
    assert all(not m._forward_hooks for m in model.modules())


def test_cholesky_cache_is_keyed_by_eps():
    from rankcut.calibrate import InputStats

    stats = InputStats(3)
    stats.update(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]))  # rank 1: needs repair
    small, large = stats.cholesky(1e-6), stats.cholesky(1e-1)
    assert stats.cholesky(1e-6) is small
    assert not torch.allclose(small, large)


def test_released_gram_keeps_its_cholesky_factor():
    from rankcut.calibrate import InputStats
    from rankcut.errors import RankcutError

    stats = InputStats(6)
    stats.update(torch.randn(50, 6))
    chol = psd_cholesky(stats.gram)
    stats.release_gram((1e-6,), "demo")
    assert stats.gram is None and stats.has_gram
    torch.testing.assert_close(stats.cholesky(1e-6, "demo"), chol)
    with pytest.raises(RankcutError, match="released"):
        stats.cholesky(1e-3, "demo")
