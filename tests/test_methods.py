"""A shared tester parametrized over every registered method, on tiny models."""

import math

import pytest
import torch

import rankcut
from rankcut.calibrate import collect_fisher, collect_input_stats, collect_layer_stats
from rankcut.errors import ConfigError, RankcutError
from rankcut.layers import LowRankLinear, StructuredLinear, dense_weight, factorized_modules
from rankcut.methods import METHODS, FwsvdConfig, MethodConfig, SvdConfig, SvdLlmConfig
from rankcut.models import find_targets, replace_module
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


#: Options that make a structured method exact at its largest size. The sparse codes of
#: dense-sparse (N of every M) and dictionary (density * k atoms per output) drop
#: coefficients by design, so only their dense limits (4:4, density 1) can reproduce a
#: matrix; what their sparse defaults guarantee is tested below.
EXACT_OPTIONS = {"dense-sparse": {"n_of_m": "4:4"}, "dictionary": {"density": 1.0}}


def full_rank(method: str, m: int, n: int) -> int:
    """Rank (low-rank methods) or budget rank (structured) at which a method is exact.

    Structured layers store more than a rank-min(m, n) product at their largest size
    (CUR: a k x k core besides k rows and columns; Kronecker: min(m1 n1, m2 n2) terms of
    m1 n1 + m2 n2 each, at most 2 m n), so they get twice that budget; svd-sparse gets
    just enough for its low-rank part to reach min(m, n) (its sparse part, a quarter of
    the budget, could not hold the whole matrix alone).
    """
    k = min(m, n)
    if METHODS[method].build is None:
        return k
    if method == "svd-sparse":
        return math.ceil(k / (1 - METHODS[method].config_cls().sparse_share))
    return 2 * k


@pytest.mark.parametrize("method", ALL_METHODS)
def test_full_rank_reproduces_model(method, windows):
    """Every targeted matrix really factorized at full rank, swapped in: same logits."""
    model = tiny_llama().double()
    with torch.no_grad():
        ref = model(input_ids=windows).logits
    spec = METHODS[method]
    config = config_for(method, **EXACT_OPTIONS.get(method, {}))
    targets = find_targets(model)
    stats = collect_layer_stats(model, targets, windows, spec.needs, progress=False)
    for name, lin in targets.items():
        w = dense_weight(lin).detach()
        rank = full_rank(method, *w.shape)
        with torch.no_grad():
            layer = spec.make_layer(w, stats[name], rank, config, name, lin.bias, w.dtype)
        # Each layer alone reproduces its matrix (float64 factors).
        product = layer.weight_product().detach()
        torch.testing.assert_close(product, w, atol=1e-10 * float(w.abs().max()), rtol=0)
        replace_module(model, name, layer)
    layers = dict(factorized_modules(model))
    assert set(layers) == set(targets) and len(layers) == 14
    expected_type = LowRankLinear if spec.build is None else StructuredLinear
    assert all(isinstance(layer, expected_type) for layer in layers.values())
    assert not any(isinstance(model.get_submodule(n), torch.nn.Linear) for n in targets)
    if spec.build is None:
        assert all(
            layer.rank == min(layer.in_features, layer.out_features) for layer in layers.values()
        )
    with torch.no_grad():
        out = model(input_ids=windows).logits
    # The model is float64 except LlamaRMSNorm, which normalizes in float32.
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["dense-sparse", "dictionary"])
def test_sparse_codes_at_full_budget(method, windows):
    """dense-sparse and dictionary with their sparse defaults are not exact at full
    budget (each output channel combines only ``count`` of the ``k`` atoms), but at the
    largest size k = min(m, n) their fit is never worse than the exact sparse coding of
    ``A = W S`` in its orthonormal right-singular basis (keep each row's largest
    coefficients; for N:M, the largest N of every M), the fit they start from."""
    model = tiny_llama()
    spec = METHODS[method]
    config = config_for(method)
    name = "model.layers.0.mlp.down_proj"  # 64 x 128: k = 64 atoms
    lin = model.get_submodule(name)
    stats = collect_layer_stats(model, {name: lin}, windows, spec.needs, progress=False)[name]
    w = dense_weight(lin).detach().double()
    m, n = w.shape
    layer = spec.make_layer(w, stats, full_rank(method, m, n), config, name)
    k, count = layer.k, layer.count
    # Defaults: 2 of every 4 consecutive atoms (2:4), or density 0.5 anywhere in the row.
    assert k == min(m, n) and count == k // 2
    sparse = layer.sparse_factor().detach()
    assert bool(((sparse != 0).sum(1) <= count).all())
    if method == "dense-sparse":  # N:M: at most 2 nonzeros in each group of 4
        assert bool(((sparse.reshape(m, k // 4, 4) != 0).sum(-1) <= 2).all())
    s = torch.linalg.cholesky(stats.inputs.gram)
    a = w @ s
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    coef = a @ vh.T  # A = coef @ vh exactly (k = rank of A)
    mag = coef.abs()
    if method == "dense-sparse":
        blocks = mag.reshape(m, k // 4, 4)
        keep = (
            torch.zeros_like(blocks, dtype=torch.bool)
            .scatter_(-1, blocks.topk(2, dim=-1).indices, True)
            .reshape(m, k)
        )
    else:
        keep = torch.zeros_like(mag, dtype=torch.bool).scatter_(1, mag.topk(count, 1).indices, True)
    start = float((coef[~keep] ** 2).sum())  # ||A - C0 V||^2 of the SVD-initialized fit
    err = float((((w - layer.weight_product().detach()) @ s) ** 2).sum())
    assert 0 < err <= start * (1 + 1e-9)


def test_full_rank_pattern_keeps_matrices_dense(windows):
    """A rank_pattern at full rank saves no parameters: those matrices stay dense,
    untouched; when that leaves nothing to factorize, compress refuses (nothing to do)."""
    model = tiny_llama()
    before = {n: dense_weight(m).detach().clone() for n, m in find_targets(model).items()}
    config = config_for("svd-llm", ratio=0.5, rank_pattern={"o_proj": 64})
    result = rankcut.compress(model, config, windows, progress=False)
    assert sorted(result.kept_dense) == sorted(n for n in before if "o_proj" in n)
    for name in result.kept_dense:
        assert torch.equal(dense_weight(model.get_submodule(name)), before[name])
    with pytest.raises(RankcutError, match="can save no parameters"):
        rankcut.compress(
            tiny_llama(),
            SvdConfig(ratio=0.5, targets=["o_proj"], rank_pattern={"o_proj": 64}),
            progress=False,
        )


def test_rank_pattern_above_full_rank_is_refused():
    """A rank above min(m, n) cannot be met: one error naming the module and its shape."""
    with pytest.raises(RankcutError, match=r"o_proj rank 65.*64 x 64.*at most rank 64"):
        rankcut.compress(tiny_llama(), SvdConfig(ratio=0.3, rank_pattern={"o_proj": 65}))


@pytest.mark.parametrize("method", LOW_RANK_METHODS)
def test_near_full_rank_is_close(method, windows):
    """Rank = min(m, n) inside the factorized layer reproduces each layer's output."""
    model = tiny_llama()
    name, lin = next(iter(find_targets(model).items()))
    spec = METHODS[method]
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
        {"allocation": "uniform", "allocation_options": {"beta_min": 0.1}},
        {"allocation": "heavy-tail", "allocation_options": {"beta_min": "x"}},
        {"allocation": "sensitivity", "allocation_options": {"candidates": [1.5]}},
        {"allocation": "sensitivity", "allocation_options": {"samples": 0}},
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
