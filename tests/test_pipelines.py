"""Sequential (block-by-block) pipeline against the whole-model pipeline."""

import copy

import pytest
import torch

import rankcut
from rankcut.errors import ConfigError, RankcutError
from rankcut.layers import dense_weight, factorized_modules
from rankcut.methods import METHODS, SvdLlmConfig
from rankcut.models import find_targets
from rankcut.pipelines import run_sequential, run_whole

from .conftest import TINY_MODELS, tiny_llama


def calib(n=6, seq=32, seed=1):
    return torch.randint(3, 400, (n, seq), generator=torch.Generator().manual_seed(seed))


def products(model):
    return {n: m.weight_product().detach() for n, m in factorized_modules(model)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_sequential_equals_whole_when_prefix_is_exact(arch):
    """Full ranks reproduce every layer, so each block sees the dense inputs: same stats."""
    x = calib(n=12)
    a, b, c = (TINY_MODELS[arch]() for _ in range(3))
    with torch.no_grad():
        ref = a(input_ids=x)[0]
    spec = METHODS["svd-llm"]
    ranks = {n: min(dense_weight(m).shape) for n, m in find_targets(a).items()}
    run_whole(a, find_targets(a), ranks, spec, SvdLlmConfig(), x, progress=False)
    plain = SvdLlmConfig(pipeline="sequential", refit=False)
    run_sequential(b, find_targets(b), ranks, spec, plain, x, progress=False)
    pa, pb = products(a), products(b)
    assert pa.keys() == pb.keys() and len(pa) > 0
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], atol=1e-4, rtol=1e-4)
    # With refit the target W C^T G'^-1 equals W when the inputs agree (up to rounding).
    run_sequential(
        c, find_targets(c), ranks, spec, SvdLlmConfig(pipeline="sequential"), x, progress=False
    )
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=x)[0], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c(input_ids=x)[0], ref, atol=1e-3, rtol=1e-3)


def test_sequential_equals_whole_on_first_block():
    """The first block's inputs are the embeddings in both pipelines."""
    x = calib()
    results = []
    for pipeline in ("whole", "sequential"):
        model = tiny_llama()
        config = SvdLlmConfig(
            ratio=0.4, targets=[r"layers\.0\.self_attn\.[qkv]_proj"], pipeline=pipeline
        )
        rankcut.compress(model, config, x, progress=False)
        results.append(products(model))
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], atol=1e-5, rtol=1e-5)


def final_error(model, dense_logits, x):
    with torch.no_grad():
        return float(torch.linalg.norm(model(input_ids=x).logits - dense_logits))


def test_sequential_has_lower_final_error_than_whole():
    x = calib(n=8, seq=48)
    dense = tiny_llama()
    dense_logits = dense(input_ids=x).logits
    errors = {}
    for pipeline in ("whole", "sequential"):
        model = copy.deepcopy(dense)
        config = SvdLlmConfig(ratio=0.4, pipeline=pipeline)  # sequential refits by default
        result = rankcut.compress(model, config, x, progress=False)
        errors[pipeline] = final_error(model, dense_logits, x)
        ranks = result.ranks
    assert errors["sequential"] < errors["whole"]
    assert ranks  # same uniform ranks in both runs


def test_refit_beats_plain_sequential():
    x = calib(n=8, seq=48)
    dense = tiny_llama()
    dense_logits = dense(input_ids=x).logits
    errors = {}
    for refit in (False, True):
        model = copy.deepcopy(dense)
        rankcut.compress(
            model, SvdLlmConfig(ratio=0.4, pipeline="sequential", refit=refit), x, progress=False
        )
        errors[refit] = final_error(model, dense_logits, x)
    assert errors[True] < errors[False]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sequential_runs_every_method(method):
    x = calib()
    model = tiny_llama()
    config = METHODS[method].config_cls(ratio=0.3, pipeline="sequential", refit=True)
    result = rankcut.compress(model, config, x, progress=False)
    # the global allocation keeps some matrices dense: every target is accounted for,
    # and the method factorized a good share of them
    assert len(result.ranks) + len(result.kept_dense) == 14 and len(result.ranks) >= 7
    assert torch.isfinite(model(input_ids=x).logits).all()


@pytest.mark.parametrize("allocation", ["energy", "global", "heavy-tail", "elbow"])
def test_allocations_in_compress_meet_budget(allocation):
    x = calib()
    model = tiny_llama()
    config = SvdLlmConfig(ratio=0.4, allocation=allocation, allocation_options={"beta_min": 0.0})
    result = rankcut.compress(model, config, x, progress=False)
    p = result.params
    assert p["targeted_after"] <= 0.6 * p["targeted_before"]
    assert p["targeted_after"] >= 0.6 * p["targeted_before"] - 2 * (64 + 128)


def test_sensitivity_allocation_end_to_end():
    x = calib()
    model = tiny_llama()
    config = SvdLlmConfig(
        ratio=0.4, allocation="sensitivity", allocation_options={"samples": 2, "seq_len": 16}
    )
    result = rankcut.compress(model, config, x, progress=False)
    assert result.params["targeted_after"] <= 0.6 * result.params["targeted_before"]


def test_pipeline_validation():
    with pytest.raises(ConfigError):
        SvdLlmConfig(pipeline="nope")
    with pytest.raises(ConfigError, match="refit"):
        SvdLlmConfig(refit="yes")
    with pytest.raises(RankcutError, match="calibration"):
        rankcut.compress(
            tiny_llama(), METHODS["svd"].config_cls(pipeline="sequential"), None, progress=False
        )


def test_reused_statistics_give_the_same_model(windows):
    """compress(..., stats=collect_statistics(...)) equals gathering them inside compress."""
    dense = tiny_llama()
    config = SvdLlmConfig(ratio=0.3, allocation="global")
    stats = rankcut.collect_statistics(dense, config, windows, progress=False)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    ra = rankcut.compress(a, config, windows, progress=False)
    rb = rankcut.compress(b, config, windows, progress=False, stats=stats)
    assert ra.ranks == rb.ranks
    assert all(v is not None for v in stats.values())  # the caller's dict is left whole
    ids = windows[:2]
    torch.testing.assert_close(a(ids).logits, b(ids).logits)
    fewer = {n: s for n, s in stats.items() if "mlp" not in n}
    with pytest.raises(RankcutError, match="lack"):
        rankcut.compress(copy.deepcopy(dense), config, windows, progress=False, stats=fewer)


def test_auto_pipeline_is_sequential_with_calibration_and_whole_without():
    from rankcut.methods import SvdConfig

    x = calib()
    model = tiny_llama()
    result = rankcut.compress(model, SvdLlmConfig(ratio=0.3), x, progress=False)
    assert result.config.pipeline == "sequential"
    assert model.rankcut_meta["method_config"]["pipeline"] == "sequential"
    plain = rankcut.compress(tiny_llama(), SvdConfig(ratio=0.3, allocation="uniform"), None)
    assert plain.config.pipeline == "whole"


def test_auto_pipeline_equals_explicit_sequential():
    x = calib()
    a, b = tiny_llama(), tiny_llama()
    rankcut.compress(a, SvdLlmConfig(ratio=0.4), x, progress=False)
    rankcut.compress(b, SvdLlmConfig(ratio=0.4, pipeline="sequential"), x, progress=False)
    for (na, la), (nb, lb) in zip(factorized_modules(a), factorized_modules(b), strict=True):
        assert na == nb
        torch.testing.assert_close(la.weight_product(), lb.weight_product(), rtol=0, atol=0)


def test_refit_at_full_rank_is_the_least_squares_map():
    """Block 1 at full rank after a truncated block 0: each matrix must be the map that
    best reproduces the dense layer's outputs from the compressed model's inputs,
    ``argmin ||X' W^T - X W_dense^T||``. Covers both ways the cross products are formed
    (``down_proj`` is narrower out than in: direct; the others go through ``X'^T X``)."""
    x = calib(n=8, seq=48)
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    targets = find_targets(model)
    ranks = {
        n: (min(dense_weight(m).shape) if ".layers.1." in n else 8) for n, m in targets.items()
    }
    block1 = [n for n in targets if ".layers.1." in n]
    run_sequential(
        model,
        targets,
        ranks,
        METHODS["svd-llm"],
        SvdLlmConfig(pipeline="sequential"),
        x,
        progress=False,
    )

    def inputs(m):
        got = {}
        hooks = [
            m.get_submodule(n).register_forward_pre_hook(
                lambda mod, args, n=n: got.update({n: args[0].reshape(-1, args[0].shape[-1])})
            )
            for n in block1
        ]
        with torch.no_grad():
            m(input_ids=x)
        for h in hooks:
            h.remove()
        return got

    xc, xd = inputs(model), inputs(dense)
    for n in block1:
        w = dense_weight(dense.get_submodule(n)).detach().double()
        a, b = xc[n].double(), xd[n].double() @ w.T
        expected = torch.linalg.lstsq(a, b).solution.T
        got = model.get_submodule(n).weight_product().detach().double()
        assert not torch.allclose(xc[n], xd[n], atol=1e-3)  # the inputs really differ
        # Compared through the outputs: where X' is nearly rank-deficient the map itself
        # is poorly determined, its outputs are not.
        torch.testing.assert_close(a @ got.T, a @ expected.T, atol=1e-4, rtol=1e-4)
        assert float(torch.linalg.norm(a @ got.T - b)) <= 1.0001 * float(
            torch.linalg.norm(a @ expected.T - b)
        )
