"""A shared tester parametrized over every registered method, on tiny models."""

import math

import pytest
import torch

import rankcut
from rankcut.calibrate import collect_fisher, collect_input_stats
from rankcut.errors import ConfigError, RankcutError
from rankcut.layers import LowRankLinear, dense_weight, factorized_modules
from rankcut.methods import METHODS, FwsvdConfig, MethodConfig, SvdConfig, SvdLlmConfig
from rankcut.models import find_targets
from rankcut.rank import rank_for_ratio

from .conftest import TINY_MODELS, tiny_llama

ALL_METHODS = sorted(METHODS)
LOW_RANK_METHODS = sorted(m for m in METHODS if METHODS[m].build is None)


def config_for(method, **kw):
    return METHODS[method].config_cls(**{"allocation": "uniform", **kw})


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_compress_every_method_every_arch(method, arch, windows):
    if method == "fwsvd" and arch == "bert":
        pytest.skip("fwsvd needs an LM loss; BertModel has none (tested below)")
    model = TINY_MODELS[arch]()
    before = sum(p.numel() for p in model.parameters())
    targets = find_targets(model)
    shapes = {n: dense_weight(m).shape for n, m in targets.items()}
    result = rankcut.compress(model, config_for(method, ratio=0.4), windows, progress=False)
    layers = dict(factorized_modules(model))
    assert set(layers) == set(targets)
    for name, layer in layers.items():
        m, n = shapes[name]
        assert layer.rank == rank_for_ratio(m, n, 0.4)
        assert isinstance(layer, LowRankLinear) == (METHODS[method].build is None)
    # Stored parameters: values plus index buffers (structured layers' index storage).
    indices = sum(getattr(x, "index_params", lambda: 0)() for x in layers.values())
    after = sum(p.numel() for p in model.parameters()) + indices
    saved = sum(x.dense_params() - x.num_params() for x in layers.values())
    assert before - after == saved == result.params["model_before"] - result.params["model_after"]
    assert result.params["targeted_after"] <= 0.6 * result.params["targeted_before"]
    out = model(input_ids=windows[:1])
    assert torch.isfinite(out[0]).all()


def test_fwsvd_needs_lm_loss(windows):
    with pytest.raises(RankcutError, match="language-modeling"):
        rankcut.compress(TINY_MODELS["bert"](), FwsvdConfig(ratio=0.3), windows, progress=False)


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if METHODS[m].needs])
def test_data_methods_require_calibration(method):
    with pytest.raises(RankcutError, match="calibration"):
        rankcut.compress(tiny_llama(), config_for(method), None, progress=False)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_full_rank_reproduces_model(method, windows):
    model = tiny_llama()
    ref = model(input_ids=windows).logits
    config = config_for(method, ratio=0.5, rank_pattern={".*": 10_000})
    result = rankcut.compress(model, config, windows, progress=False)
    # Full rank never saves parameters: everything stays dense and exact.
    assert not result.ranks and len(result.kept_dense) == 14
    torch.testing.assert_close(model(input_ids=windows).logits, ref)


@pytest.mark.parametrize("method", LOW_RANK_METHODS)
def test_near_full_rank_is_close(method, windows):
    """Rank = min(m, n) inside the factorized layer reproduces each layer's output."""
    model = tiny_llama()
    name, lin = next(iter(find_targets(model).items()))
    spec = METHODS[method]
    from rankcut.calibrate import collect_layer_stats

    stats = collect_layer_stats(model, {name: lin}, windows, spec.needs, progress=False)[name]
    w = dense_weight(lin).detach().double()
    up, down = spec.factorize(w, stats, min(w.shape), config_for(method), name)
    torch.testing.assert_close(up @ down, w, atol=1e-8, rtol=1e-8)


def _output_error(model, name, up, down, windows):
    lin = find_targets(model)[name]
    x = collect_input_stats(model, {name: lin}, windows, progress=False)[name]
    w = dense_weight(lin).detach().double()
    delta = w - up @ down
    return float(torch.trace(delta @ x.gram @ delta.T))  # ||(W - W') X^T||_F^2


def test_svd_llm_lower_output_error_than_svd(windows):
    model = tiny_llama()
    for name, lin in find_targets(model).items():
        x = collect_input_stats(model, {name: lin}, windows, progress=False)[name]
        w = dense_weight(lin).detach().double()
        r = max(1, min(w.shape) // 4)
        stats = type("S", (), {"inputs": x})()
        svd_up, svd_down = METHODS["svd"].factorize(w, stats, r, SvdConfig(), name)
        llm_up, llm_down = METHODS["svd-llm"].factorize(w, stats, r, SvdLlmConfig(), name)
        assert _output_error(model, name, llm_up, llm_down, windows) < _output_error(
            model, name, svd_up, svd_down, windows
        )


def test_fwsvd_lowers_fisher_weighted_error(windows):
    model = tiny_llama()
    targets = find_targets(model)
    fisher, _ = collect_fisher(model, targets, windows, progress=False)
    for name, lin in targets.items():
        w = dense_weight(lin).detach().double()
        r = max(1, min(w.shape) // 4)
        f = fisher[name]
        stats = type("S", (), {"fisher_in": f})()
        fw = torch.matmul(*METHODS["fwsvd"].factorize(w, stats, r, FwsvdConfig(), name))
        plain = torch.matmul(*METHODS["svd"].factorize(w, stats, r, SvdConfig(), name))

        def weighted(approx, f=f, w=w):
            return float((((w - approx) ** 2) * f[None, :]).sum())

        assert weighted(fw) < weighted(plain)


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


def test_targets_exclude_and_errors():
    model = tiny_llama()
    assert len(find_targets(model)) == 14  # 7 linears x 2 layers; lm_head excluded
    assert "lm_head" not in find_targets(model)
    mlp_only = find_targets(model, exclude=["self_attn"])
    assert len(mlp_only) == 6
    assert set(find_targets(model, targets=[r"lm_head"])) == {"lm_head"}
    with pytest.raises(RankcutError, match="q_proj"):
        find_targets(model, targets=["nothing-matches"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": 0},
        {"ratio": 1},
        {"ratio": -0.1},
        {"ratio": "x"},
        {"targets": ["("]},
        {"rank_pattern": {"q": -1}},
        {"allocation": "nope"},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        SvdLlmConfig(**kwargs)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_config_json_round_trip(method):
    config = config_for(method, ratio=0.3, exclude=["mlp"], rank_pattern={"q_proj": 4})
    data = config.to_dict()
    assert data["method"] == method and data["version"] >= 1
    assert MethodConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="unknown"):
        MethodConfig.from_dict({**data, "bogus": 1})


def test_rank_formula_and_dense_fallback():
    assert rank_for_ratio(576, 1536, 0.2) == math.floor(0.8 * 576 * 1536 / (576 + 1536))
    assert rank_for_ratio(2, 2, 0.1) == 0  # factorizing a 2x2 cannot save parameters
    model = tiny_llama()
    result = rankcut.compress(
        model,
        SvdConfig(ratio=0.3, rank_pattern={"o_proj": 40}, allocation="uniform"),
        progress=False,
    )
    # o_proj is 64x64: rank 40 costs 40*128 > 64*64, so it stays dense.
    assert all("o_proj" in n for n in result.kept_dense) and len(result.kept_dense) == 2


def test_non_finite_weight_is_rejected():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(RankcutError, match="non-finite"):
        rankcut.compress(model, SvdConfig(ratio=0.3), progress=False)


def test_cholesky_cache_is_keyed_by_eps():
    from rankcut.calibrate import InputStats

    stats = InputStats(3)
    stats.update(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]))  # rank 1: needs repair
    small, large = stats.cholesky(1e-6), stats.cholesky(1e-1)
    assert stats.cholesky(1e-6) is small
    assert not torch.allclose(small, large)
