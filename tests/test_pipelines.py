"""Sequential (block-by-block) pipeline against the whole-model pipeline."""

import copy
import re

import pytest
import torch

import rankcut
from rankcut.errors import ConfigError, RankcutError
from rankcut.layers import LowRankLinear, StructuredLinear, dense_weight, factorized_modules
from rankcut.methods import METHODS, SvdLlmConfig
from rankcut.models import find_targets
from rankcut.pipelines import run_sequential, run_whole
from rankcut.rank import rank_for_ratio

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


def layer_inputs(model, names, x):
    """``{name: (tokens, in) float64}``: what each module receives on ``x``."""
    got = {}

    def hook_for(name):
        def hook(module, args):
            got[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sequential_runs_every_method(method):
    """What the sequential pipeline must do with every method.

    1. Block 0 truncated, block 1 at full rank (``run_sequential``, refit on):
       - q/k/v of block 0 read the embeddings in both streams, so they must be exactly
         the method applied to the dense weight with the statistics of those inputs;
       - block 1 is reached through a compressed block 0, so each of its matrices must
         be the map that best reproduces the dense outputs from the compressed model's
         inputs, ``argmin ||X' W^T - X W_dense^T||`` (compared through the outputs:
         where X' is nearly rank-deficient the map is poorly determined, they are not).
    2. Through ``compress``: each allocated matrix is replaced by the method's layer at
       its allocated rank, the matrices kept dense are left untouched.
    A block skipped, statistics from the dense stream or from part of the data, or the
    refit left out, each breaks one of these.
    """
    from rankcut.calibrate import InputStats, LayerStats, collect_fisher

    from .test_methods import EXACT_OPTIONS, full_rank

    x = calib()
    spec = METHODS[method]
    kind = LowRankLinear if spec.build is None else StructuredLinear
    dense = tiny_llama()
    targets = find_targets(dense)

    model = copy.deepcopy(dense)
    # refit_damp=0: the plain least squares (its ridge: test_refit_at_full_rank_is_...)
    config = spec.config_cls(
        pipeline="sequential", refit=True, refit_damp=0.0, **EXACT_OPTIONS.get(method, {})
    )
    shapes = {n: dense_weight(m).shape for n, m in targets.items()}
    ranks = {
        n: full_rank(method, *shape) if ".layers.1." in n else rank_for_ratio(*shape, 0.4)
        for n, shape in shapes.items()
    }
    run_sequential(model, find_targets(model), ranks, spec, config, x, progress=False)
    layers = dict(factorized_modules(model))
    assert set(layers) == set(targets)
    assert all(isinstance(layer, kind) and layer.rank == ranks[n] for n, layer in layers.items())

    xc, xd = layer_inputs(model, targets, x), layer_inputs(dense, targets, x)
    fisher = collect_fisher(dense, targets, x, progress=False)[0] if "fisher" in spec.needs else {}
    norm = torch.linalg.norm
    for name in targets:
        w = dense_weight(targets[name]).detach().double()
        got = layers[name].weight_product().detach().double()
        a, b = xc[name], xd[name] @ w.T  # compressed model's inputs, dense outputs
        if re.search(r"layers\.0\.self_attn\.[qkv]_proj$", name):
            torch.testing.assert_close(a, xd[name])
            inputs = InputStats(a.shape[1], gram=a.T @ a, abs_sum=a.abs().sum(0), tokens=len(a))
            stats = LayerStats(inputs=inputs, fisher_in=fisher.get(name))
            expected = spec.approximate(w, stats, ranks[name], config, name).detach()
            assert norm(a @ (got - expected).T) <= 1e-5 * norm(a @ expected.T), name
            assert not torch.allclose(got, w, atol=1e-3)  # really truncated
        elif ".layers.1." in name:
            assert not torch.allclose(a, xd[name], atol=1e-3)  # the inputs really differ
            expected = torch.linalg.lstsq(a, b).solution.T
            # Float32 activations in the pipeline's Gram: ~2e-4 on o_proj (conditioned
            # ~1e3); a wrong stream, statistic or target is off by 5% or more.
            assert norm(a @ (got - expected).T) <= 1e-3 * norm(b), name

    model = copy.deepcopy(dense)
    config = spec.config_cls(ratio=0.3, pipeline="sequential", refit=True)
    result = rankcut.compress(model, config, x, progress=False)
    assert len(result.ranks) + len(result.kept_dense) == 14 and len(result.ranks) >= 7
    layers = dict(factorized_modules(model))
    assert set(layers) == set(result.ranks)
    for name, layer in layers.items():
        assert isinstance(layer, kind) and layer.rank == result.ranks[name], name
    for name in result.kept_dense:
        assert torch.equal(dense_weight(model.get_submodule(name)), dense_weight(targets[name]))


@pytest.mark.parametrize("allocation", ["energy", "global", "heavy-tail", "elbow"])
def test_allocations_in_compress_meet_budget(allocation):
    x = calib()
    model = tiny_llama()
    options = {"beta_min": 0.0} if allocation == "heavy-tail" else {}
    config = SvdLlmConfig(ratio=0.4, allocation=allocation, allocation_options=options)
    result = rankcut.compress(model, config, x, progress=False)
    p = result.params
    assert p["targeted_after"] <= 0.6 * p["targeted_before"]
    assert p["targeted_after"] >= 0.6 * p["targeted_before"] - 2 * (64 + 128)


def sensitive_llama():
    """A tiny Llama in which two matrices matter far more to the loss than the rest, and
    calibration windows sampled from it.

    ``o_proj`` of block 1 is scaled by 50, so the attention branch of block 1 dominates
    the residual stream; any error in it, or in the ``v_proj`` feeding it, moves the
    logits far more than an error elsewhere (embeddings, tied to the head, are scaled by
    10 so that the logits are peaked enough for that to matter). The windows are
    sampled from the model itself, so a change of the model raises the expected loss
    by KL(p_dense || p_changed) >= 0: large for these two, small for the others.
    Spectra do not tell them apart: scaling a matrix leaves its relative energy as is.
    """
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
        model.model.layers[1].self_attn.o_proj.weight.mul_(50.0)
        ids = torch.randint(3, 400, (6, 1), generator=gen)
        for _ in range(31):
            p = model(input_ids=ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=gen)], 1)
    return model, ids


def test_sensitivity_allocation_end_to_end():
    """The measured sensitivities steer the ranks: the two sensitive matrices keep more
    than their uniform rank (or stay dense), and the compressed model's calibration loss
    rises far less than under uniform ranks at the same budget."""
    from rankcut.calibrate.sensitivity import mean_loss

    dense, x = sensitive_llama()
    base = mean_loss(dense, x)
    losses, results = {}, {}
    for allocation in ("sensitivity", "uniform"):
        model = copy.deepcopy(dense)
        options = {"samples": 2, "seq_len": 16} if allocation == "sensitivity" else {}
        config = SvdLlmConfig(ratio=0.4, allocation=allocation, allocation_options=options)
        results[allocation] = rankcut.compress(model, config, x, progress=False)
        losses[allocation] = mean_loss(model, x) - base
    result = results["sensitivity"]
    for name in ("model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"):
        uniform = rank_for_ratio(*dense_weight(dense.get_submodule(name)).shape, 0.4)
        assert results["uniform"].ranks[name] == uniform
        assert name in result.kept_dense or result.ranks[name] > uniform, name
    assert losses["uniform"] > 0.02  # uniform ranks truncate the sensitive matrices...
    assert losses["sensitivity"] < 0.25 * losses["uniform"]  # ...the sensitivity ranks do not
    p = result.params  # and the budget is met, not undershot
    assert 0.6 * p["targeted_before"] - 2 * (64 + 128) <= p["targeted_after"]
    assert p["targeted_after"] <= 0.6 * p["targeted_before"]


def test_pipeline_validation():
    with pytest.raises(ConfigError):
        SvdLlmConfig(pipeline="nope")
    with pytest.raises(ConfigError, match="refit"):
        SvdLlmConfig(refit="yes")
    for bad in (-0.1, "0.01", True):
        with pytest.raises(ConfigError, match="refit_damp"):
            SvdLlmConfig(refit_damp=bad)
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


@pytest.mark.parametrize("damp", [0.0, 0.01, 1.0])
def test_refit_at_full_rank_is_the_least_squares_map(damp):
    """Block 1 at full rank after a truncated block 0: each matrix must be the map that
    best reproduces the dense layer's outputs from the compressed model's inputs,
    ``argmin ||X' W^T - X W_dense^T||^2 + lam ||W - W_dense||^2`` with ``lam = damp *
    mean(diag X'^T X')`` (``refit_damp``; 0: the plain least squares). Covers both ways
    the cross products are formed (``down_proj`` is narrower out than in: direct; the
    others go through ``X'^T X``)."""
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
        SvdLlmConfig(pipeline="sequential", refit_damp=damp),
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
        lam = damp * float((a * a).sum(0).mean())
        # the ridge towards w as a stacked least squares: [a; sqrt(lam) I] W^T = [b; sqrt(lam) w^T]
        eye = torch.eye(a.shape[1], dtype=a.dtype) * lam**0.5
        expected = torch.linalg.lstsq(torch.cat([a, eye]), torch.cat([b, eye @ w.T])).solution.T
        got = model.get_submodule(n).weight_product().detach().double()
        assert not torch.allclose(xc[n], xd[n], atol=1e-3)  # the inputs really differ
        # Compared through the outputs: where X' is nearly rank-deficient the map itself
        # is poorly determined, its outputs are not.
        torch.testing.assert_close(a @ got.T, a @ expected.T, atol=1e-4, rtol=1e-4)

        def objective(m, a=a, b=b, w=w, lam=lam):
            return float(torch.linalg.norm(a @ m.T - b) ** 2 + lam * torch.linalg.norm(m - w) ** 2)

        assert objective(got) <= 1.0001 * objective(expected)


def _block_runs(model, monkeypatch):
    """Count the completed runs of each decoder block (a pass stopped early at a
    module's input does not complete the block, so it is not counted; nor are the calls
    of the pass that reads each block's arguments, ``capture_block_calls``, which
    bypasses the blocks)."""
    from rankcut.pipelines import sequential

    runs = {}
    capturing = []
    capture = sequential.capture_block_calls

    def uncounted(*args, **kwargs):
        capturing.append(True)
        try:
            return capture(*args, **kwargs)
        finally:
            capturing.pop()

    monkeypatch.setattr(sequential, "capture_block_calls", uncounted)
    for name, block in rankcut.models.find_decoder_layers(model):
        runs[name] = 0

        def hook(mod, args, out, name=name):
            if not capturing:
                runs[name] += 1

        block.register_forward_hook(hook)
    return runs


def test_sequential_runs_each_block_no_more_than_needed(monkeypatch):
    """Per block and batch: one dense run (its outputs and the stages' dense inputs) and
    one run of the compressed block (the last stage's pass, which gives the next block's
    inputs; none after the last block), plus, in the first block only, one run testing
    that ``down_proj`` adds to the block's output (later blocks of the class reuse it)."""
    x = calib(n=12)  # three batches of four windows
    model = tiny_llama(num_hidden_layers=3)
    runs = _block_runs(model, monkeypatch)
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential")
    targets = find_targets(model)
    ranks = {n: 8 for n in targets}
    run_sequential(model, targets, ranks, METHODS["svd-llm"], config, x, progress=False)
    assert list(runs.values()) == [3 + 3 + 1, 3 + 3, 3]


def test_sequential_tail_shortcut_changes_nothing(monkeypatch):
    """The compressed block's outputs kept from the last stage's pass (``base + M'(x)``)
    equal a run of the compressed block, to float rounding; with the shortcut refused
    the outputs come from a run replaying the attention (``_Replay``), equal too."""
    from rankcut.calibrate.sequential import capture_block_calls
    from rankcut.models import find_decoder_layers
    from rankcut.pipelines import sequential

    x = calib(n=8)
    config = SvdLlmConfig(ratio=0.4, pipeline="sequential")
    shortcuts = []
    real_outputs = sequential._Tail.outputs
    monkeypatch.setattr(
        sequential._Tail,
        "outputs",
        lambda self, layer: shortcuts.append(1) or real_outputs(self, layer),
    )
    for additive in (True, False):
        if not additive:
            monkeypatch.setattr(sequential._Tail, "TOLERANCE", -1.0)
        model = tiny_llama(num_hidden_layers=2)
        targets = find_targets(model)
        ranks = {n: 8 for n in targets}
        name, block = find_decoder_layers(model)[0]
        comp, _ = capture_block_calls(model, [block], x, batch_size=4)
        _, comp_out = sequential.compress_block(
            model, name, block, targets, ranks, METHODS["svd-llm"], config, comp, comp, {}
        )
        assert isinstance(block.mlp.down_proj, LowRankLinear)
        assert len(shortcuts) == 1  # taken when additive, refused after
        expected = list(sequential.advance(block, comp))
        assert len(comp_out) == len(expected) == 2
        for got, want in zip(comp_out, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _Residual(torch.nn.Module):
    def __init__(self, post_norm: bool) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)
        self.norm = torch.nn.LayerNorm(8) if post_norm else torch.nn.Identity()

    def forward(self, h):
        return self.norm(h + self.down(torch.relu(self.up(h))))


@pytest.mark.parametrize("post_norm", [False, True])
def test_tail_shortcut_only_where_the_output_adds(post_norm):
    """A residual branch's last linear adds to the block's output (shortcut taken, the
    outputs equal a block run); behind a norm it does not (shortcut refused). The next
    block of the class takes the answer from ``BlockFacts`` without the test's run."""
    from rankcut.calibrate.sequential import BlockInputs
    from rankcut.pipelines.sequential import BlockFacts, _Tail

    torch.manual_seed(0)
    block = _Residual(post_norm)
    batches = [BlockInputs(torch.randn(2, 5, 8), (), {}) for _ in range(2)]
    facts = BlockFacts()
    tail = _Tail(block.down, block, "down", facts)
    xs = [tail.input(b, first=i == 0) for i, b in enumerate(batches)]
    assert tail.active is (not post_norm)
    assert xs[0] is not None and xs[0].shape == (2, 5, 16)
    other = _Residual(post_norm)
    runs = []
    other.register_forward_hook(lambda *a: runs.append(1))
    again = _Tail(other.down, other, "down", facts)
    assert again.known is (not post_norm) and again.active is (not post_norm)
    if again.active:
        again.input(batches[0], first=True)
        assert len(runs) == 1 and again.active  # no second, perturbed run
    if not post_norm:
        replaced = torch.nn.Linear(16, 8)
        block.down = replaced
        with torch.no_grad():
            expected = [block(b.hidden) for b in batches]
        for got, want in zip(tail.outputs(replaced), expected, strict=True):
            torch.testing.assert_close(got, want)


def test_fused_statistics_pass_changes_nothing(monkeypatch):
    """Cross products gathered beside the Gram (and the first stage's taken from it)
    give exactly what their own passes after the Gram gave."""
    import rankcut.pipelines.sequential as sequential

    x = calib(n=8)
    models = {}
    for fused in (True, False):
        monkeypatch.setattr(sequential, "FUSED_CROSS_BYTES", 512 * 2**20 if fused else -1)
        model = tiny_llama()
        targets = find_targets(model)
        ranks = {n: 8 for n in targets}
        config = SvdLlmConfig(pipeline="sequential")
        run_sequential(model, targets, ranks, METHODS["svd-llm"], config, x, progress=False)
        models[fused] = products(model)
    assert models[True].keys() == models[False].keys()
    for n in models[True]:
        torch.testing.assert_close(models[True][n], models[False][n], rtol=0, atol=0)


def _compress_products(monkeypatch, kept: bool, x, make=None, **config):
    """``compress`` (sequential, refit, global allocation) with the dense stage inputs
    kept from the statistics pass (no dense block run allowed) or not kept at all."""
    import rankcut.api as api
    import rankcut.calibrate.activations as activations
    import rankcut.pipelines.sequential as sequential

    with monkeypatch.context() as m:
        if kept:

            def no_dense_run(*args, **kwargs):
                raise AssertionError("a dense block ran although its inputs were kept")

            m.setattr(sequential, "_dense_pass", no_dense_run)
        else:
            m.setattr(activations, "MEMORY_FRACTION", 0.0)
        model = make() if make is not None else tiny_llama(num_hidden_layers=3)
        cfg = SvdLlmConfig(ratio=0.4, pipeline="sequential", **config)
        plan = {}
        real_plan = api.make_plan

        def spy(*args, **kwargs):
            plan["plan"] = real_plan(*args, **kwargs)
            plan["kept"] = plan["plan"].dense_inputs is not None
            return plan["plan"]

        m.setattr(api, "make_plan", spy)
        rankcut.compress(model, cfg, x, progress=False)
        assert plan["kept"] is kept
        assert plan["plan"].dense_inputs is None  # the pipeline released them
    return products(model)


@pytest.mark.parametrize(
    "config",
    [
        {},  # every window back-propagated (few tokens)
        {"fisher_tokens": 64},  # two windows back-propagated, the rest forward-only
        {"exclude": [r"layers\.1\."]},  # a block with no targets: the dense stream crosses it
        {"rank_pattern": {r"layers\.0\.self_attn\.q_proj": 64}},  # q kept dense, k/v shared
    ],
    ids=["all-grad", "forward-only", "empty-block", "owner-kept"],
)
def test_dense_inputs_kept_from_statistics_change_nothing(monkeypatch, config):
    """The refit's dense stage inputs kept from the allocation's statistics pass give
    the model that rerunning the dense blocks gives (to float rounding: the pass batches
    windows differently)."""
    x = calib(n=12)
    with_kept = _compress_products(monkeypatch, True, x, **config)
    rerun = _compress_products(monkeypatch, False, x, **config)
    assert with_kept.keys() == rerun.keys()
    if "exclude" in config:
        assert not any(".layers.1." in n for n in with_kept)
    for n in with_kept:
        torch.testing.assert_close(with_kept[n], rerun[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_dense_inputs_kept_change_nothing_on_other_architectures(monkeypatch, arch):
    """GPT-2 (``Conv1D`` with biases, so every stage is kept as its input) and BERT (no
    loss: the statistics pass is forward-only; a norm after each residual) give the
    same model too."""
    x = calib(n=8)

    def make():  # biases are zero at init: give them values, the same in both models
        model = TINY_MODELS[arch]()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(getattr(m, "bias", None), torch.nn.Parameter):
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        return model

    with_kept = _compress_products(monkeypatch, True, x, make)
    rerun = _compress_products(monkeypatch, False, x, make)
    assert with_kept.keys() == rerun.keys() and len(with_kept) > 0
    for n in with_kept:
        torch.testing.assert_close(with_kept[n], rerun[n], rtol=1e-5, atol=1e-6)


def test_stage_inputs_keep_one_tensor_per_shared_input_and_regroup():
    """A stage is kept as its shared input, or (narrower outputs, float32) as each
    module's output less its bias; both regrouped to the compressed stream's batches."""
    from rankcut.calibrate import StageInputs

    torch.manual_seed(0)
    q, k = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    down = torch.nn.Linear(6, 3, bias=False)  # narrower than its input: kept as outputs
    with_bias = torch.nn.Linear(6, 3)  # narrower too, but outputs less a bias lose digits
    keep = StageInputs(tokens=12)
    xs = [torch.randn(2, 3, 4) for _ in range(2)]  # two batches of two windows of 3
    hs = [torch.randn(2, 3, 6) for _ in range(2)]
    for x, h in zip(xs, hs, strict=True):
        keep.record(q, "blk.q", "blk.q", x, q(x))
        keep.record(k, "blk.k", "blk.q", x, k(x))  # the same tensor: shares q's input
        keep.record(down, "blk.down", "blk.down", h, down(h))
        keep.record(with_bias, "nxt.fc", "nxt.fc", h + 1, with_bias(h + 1))
        keep.end_batch()
    assert keep.outputs == {"blk.down"}
    assert keep.nbytes == 4 * 12 * (4 + 3 + 6)
    stages, got = keep.take_block("blk.", ["blk.k", "blk.down"], [3, 3, 3, 3])
    assert stages == [["blk.k"], ["blk.down"]]  # q kept dense: k's stage reads q's input
    assert [t.shape for t in got["blk.k"]] == [(3, 4)] * 4
    torch.testing.assert_close(torch.cat(got["blk.k"]), torch.cat(xs).reshape(-1, 4))
    products = torch.cat([b["blk.down"] for b in got["blk.down"]])
    want = torch.cat(hs).reshape(-1, 6) @ down.weight.detach().T
    torch.testing.assert_close(products, want)
    assert set(keep.parts) == {("in", "nxt.fc")}  # another block's: still kept
    stages, got = keep.take_block("nxt.", ["nxt.fc"], [12])
    torch.testing.assert_close(got["nxt.fc"][0], torch.cat(hs).reshape(-1, 6) + 1)
    assert keep.parts == {}  # released
    with pytest.raises(RankcutError, match="never called"):
        keep.take_block("blk.", ["blk.v"], [12])


def test_stage_inputs_dropped_when_they_would_not_fit():
    from rankcut.calibrate import StageInputs

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(10, 4)
    keep = StageInputs(tokens=1000, budget=1000 * 4 * 4)  # room for one 4-wide input
    keep.record(lin, "q", "q", x, lin(x))
    keep.end_batch()
    assert keep.active and keep.nbytes == 10 * 4 * 4 and keep.covers(["q"])
    keep = StageInputs(tokens=1000, budget=1000 * 4 * 4)
    keep.record(lin, "q", "q", x, lin(x))
    keep.record(lin, "o", "o", x + 1, lin(x + 1))
    keep.end_batch()  # the projection exceeds the budget
    assert not keep.active and keep.parts == {} and not keep.covers(["q"])
    keep.record(lin, "q", "q", x, lin(x))
    assert keep.parts == {}


def test_stage_inputs_dropped_when_the_model_changes_an_input_in_place():
    """A block that changes a target's input after the target read it would leave other
    values in a kept reference than the target saw: nothing is kept then."""
    from rankcut.calibrate import StageInputs

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(10, 4)
    keep = StageInputs(tokens=20, budget=1 << 20)
    keep.record(lin, "q", "q", x, lin(x))
    keep.end_batch()
    assert keep.active
    y = torch.randn(10, 4)
    keep.record(lin, "q", "q", y, lin(y))
    y.mul_(2)  # after q read it
    keep.end_batch()
    assert not keep.active and keep.parts == {}


class _ChangesInput(torch.nn.Module):
    """A block whose second linear's input is doubled in place after it was read."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        y = torch.tanh(self.a(x))
        out = x + self.b(y)
        y.mul_(2)
        return out + y


def test_dense_pass_keeps_the_inputs_a_block_changes_in_place():
    from rankcut.calibrate.sequential import BlockInputs
    from rankcut.pipelines.sequential import _dense_pass

    torch.manual_seed(0)
    block = _ChangesInput()
    batches = [BlockInputs(torch.randn(2, 3, 4), (), {}) for _ in range(3)]
    seen = []
    block.b.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    modules = {"a": block.a, "b": block.b}
    stages, captured, outputs = _dense_pass(block, modules, batches, lambda _: [])
    assert stages == [["a"], ["b"]]
    # the first batch ran twice (the change seen, then with copies)
    assert len(seen) == 4 and len(captured["b"]) == 3
    for got, want in zip(captured["b"], seen[1:], strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        for out, b in zip(outputs, batches, strict=True):
            torch.testing.assert_close(out, block(b.hidden))


def _compress_replayed(monkeypatch, replay: bool, make, x, **config):
    """``compress`` (sequential, refit) with the block children's replay on or off;
    also the number of attention runs (the class ``forward``: replayed ones skip it)."""
    import rankcut.pipelines.sequential as sequential

    calls = {"attention": 0}
    with monkeypatch.context() as m:
        m.setattr(sequential, "REPLAY", replay)
        model = make()
        attention = type(model.get_submodule(_attention_name(model)))
        real = attention.forward

        def counted(self, *args, **kwargs):
            calls["attention"] += 1
            return real(self, *args, **kwargs)

        m.setattr(attention, "forward", counted)
        rankcut.compress(model, SvdLlmConfig(pipeline="sequential", **config), x, progress=False)
    return products(model), calls["attention"]


def _attention_name(model):
    return next(
        n for n, _ in model.named_modules() if re.search(r"\.(self_attn|attn|attention)$", n)
    )


O_GATE = {r"o_proj": 8, r"gate_proj": 8}  # (the allocation alone leaves them dense here)


@pytest.mark.parametrize(
    "arch,config",
    [
        ("llama", {"ratio": 0.4}),
        ("llama", {"ratio": 0.4, "exclude": [r"down_proj"]}),  # last stage gate/up: advanced
        ("llama", {"exclude": [r"up_proj", r"down_proj"], "rank_pattern": O_GATE}),  # no tail
        ("llama", {"exclude": [r"mlp"], "rank_pattern": O_GATE}),  # last o_proj: o_proj' replayed
        ("llama", {"ratio": 0.4, "refit": False}),
        ("gpt2", {"ratio": 0.4}),
        ("bert", {"ratio": 0.4}),  # a norm after each residual: no tail, advanced by replay
    ],
    ids=[
        "llama",
        "llama-no-down",
        "llama-gate-last",
        "llama-attention-only",
        "llama-no-refit",
        "gpt2",
        "bert",
    ],
)
def test_replayed_children_change_nothing(monkeypatch, arch, config):
    """Replaying the outputs of a block's children that an earlier pass computed on the
    same inputs gives bit for bit the model that running them again gives, with fewer
    attention runs wherever an attention finished before the last stage."""
    x = calib(n=8)
    # three blocks: what the first block of a class shows (BlockFacts) serves the second
    make = (lambda: tiny_llama(num_hidden_layers=3)) if arch == "llama" else TINY_MODELS[arch]
    replayed, fewer = _compress_replayed(monkeypatch, True, make, x, **config)
    rerun, runs = _compress_replayed(monkeypatch, False, make, x, **config)
    assert replayed.keys() == rerun.keys() and len(replayed) > 0
    for n in replayed:
        torch.testing.assert_close(replayed[n], rerun[n], rtol=0, atol=0)
    assert fewer < runs


def test_replay_drops_children_after_a_replaced_module():
    """A replaced module invalidates its child and every child called after it, not
    those called before; a child called twice per run turns the replay off."""
    from rankcut.pipelines.sequential import _Replay

    class Block(torch.nn.Module):
        def __init__(self, twice=False):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))
            self.twice = twice

        def forward(self, x):
            y = self.b(self.a(x))
            return self.c(self.a(y) if self.twice else y)

    block = Block()
    replay = _Replay(block, "blk.")
    xs = [torch.randn(2, 4) for _ in range(2)]
    outs = []
    for i, x in enumerate(xs):
        with replay.batch(i), torch.no_grad():
            outs.append(block(x))
    replay.end_pass()
    assert replay.order == ["a", "b", "c"] and set(replay.kept) == {"a", "b", "c"}
    replay.changed(["blk.b"])
    assert set(replay.kept) == {"a"}
    with torch.no_grad():
        block.a.weight.zero_()  # a replayed child's own forward is not called
        with replay.batch(1, record=False):
            out = block(xs[1])
    torch.testing.assert_close(out, outs[1], rtol=0, atol=0)  # a's kept output, not zeros
    assert "forward" not in vars(block.a)  # its own forward is back
    twice = Block(twice=True)
    replay = _Replay(twice, "blk.")
    with replay.batch(0):
        twice(xs[0])
    assert not replay.enabled and replay.kept == {}


def test_replay_keeps_a_child_that_returns_its_replaced_module():
    """A child returning its module's output (Llama's attention and ``o_proj``) keeps
    its outputs when that module is replaced: the new module on the inputs its stage
    kept, what running the child gives. Seen in one block, used in the next of the
    class; a child that transforms the module's output, or returns an object beside it
    (reused for every batch, it must be a plain value), is never taken for one."""
    from rankcut.pipelines.sequential import BlockFacts, _Replay

    class Attention(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.inner, self.out = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.kind = kind

        def forward(self, x):
            y = self.out(torch.tanh(self.inner(x)))
            beside = object() if self.kind == "object beside" else None  # (a cache, say)
            return (y * 2 if self.kind == "transformed" else y), beside

    class Block(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.attn, self.mlp = Attention(kind), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.mlp(x + self.attn(x)[0])

    for kind in ("returned", "transformed", "object beside"):
        after = kind != "returned"
        facts = BlockFacts()
        xs = [torch.randn(2, 4) for _ in range(2)]
        with torch.no_grad():
            first = Block(kind)
            replay = _Replay(first, "blk.", modules=["blk.attn.out"], facts=facts)
            for i, x in enumerate(xs):
                with replay.batch(i):
                    first(x)  # the attention completes: what it returns is seen
            block = Block(kind)
            replay = _Replay(block, "blk.", modules=["blk.attn.out"], facts=facts)
            assert replay.wants_inputs(["blk.attn.out"]) is (not after)
            if after:
                continue
            inputs = [torch.tanh(block.attn.inner(x)) for x in xs]  # the stage's inputs
            for i, x in enumerate(xs):
                with replay.batch(i):
                    block(x)
            replay.end_pass(["blk.attn.out"])
            block.attn.out = torch.nn.Linear(4, 4)  # the stage factorized
            replay.changed(["blk.attn.out"], inputs)
            assert set(replay.kept) == {"attn"}
            expected = [block(x) for x in xs]
            block.attn.inner.weight.zero_()  # replayed: the attention does not run
            for i, x in enumerate(xs):
                with replay.batch(i, record=False):
                    torch.testing.assert_close(block(x), expected[i], rtol=0, atol=0)
