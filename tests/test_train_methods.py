"""The factorized training methods (``lrt``, ``sltrain``, ``maestro``, ``trp``) and the TRP
hook, driven the way ``rankcut.train.loop`` drives them: check, prepare, optimizer,
hooks, steps, finalize; sizing, errors, and a resume that equals the uninterrupted run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import rankcut
from rankcut.decompose.cur import energy_rank
from rankcut.errors import ConfigError
from rankcut.layers import LowRankLinear, MaestroLinear, SLTrainLinear, factorized_modules
from rankcut.models.structure import find_targets
from rankcut.train import HOOKS
from rankcut.train.lowrank_methods import distillation_loss, maestro_cut, sltrain_sizes
from rankcut.train.methods import TRAIN_METHODS, TrainSetup, train_method
from rankcut.train.regularizers import TRPHook

from .conftest import tiny_llama

METHODS = ("lrt", "sltrain", "maestro", "trp")
LAYER_TYPE = {"lrt": LowRankLinear, "sltrain": SLTrainLinear, "maestro": MaestroLinear}


def batches(n: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 400, (n, 2, 16), generator=gen)


def setup_for(model, **kwargs) -> TrainSetup:
    kwargs.setdefault("steps", 6)
    kwargs.setdefault("lr", 1e-3)
    return TrainSetup(targets=list(find_targets(model)), **kwargs)


class Run:
    """The loop's protocol (``rankcut.train.loop``), step by step."""

    def __init__(self, name: str, model: nn.Module, setup: TrainSetup):
        self.model, self.setup = model, setup
        self.method = train_method(name)
        self.method.check(setup)
        self.method.prepare(model, setup)
        self.opt = self.method.optimizer(model, setup)
        self.hooks = self.method.hooks(model, setup)
        self.losses: list[float] = []

    def steps(self, start: int, stop: int, data: torch.Tensor) -> Run:
        self.model.train()
        for step in range(start, stop):
            loss = self.method.loss(self.model, data[step % len(data)], step)
            for hook in self.hooks:
                penalty = hook.penalty(self.model)
                if penalty is not None:
                    loss = loss + penalty
            loss.backward()
            for hook in self.hooks:
                hook.on_backward(self.model, step)
            self.opt.step()
            self.opt.zero_grad()
            for hook in self.hooks:
                hook.on_step(self.model, step)
            self.losses.append(float(loss.detach()))
        return self

    def checkpoint(self) -> dict:
        clone = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {
            "model": clone,
            "optimizer": _clone_state(self.opt.state_dict()),
            "method": self.method.state_dict(),
        }


def _clone_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_state(v) for v in obj]
    return obj


def target_params(model, names) -> tuple[int, int]:
    """(stored weight parameters, dense parameters) of the targets."""
    stored = dense = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            stored += module.weight.numel()
            dense += module.weight.numel()
        else:
            stored += module.weight_params()
            dense += module.in_features * module.out_features
    return stored, dense


def test_the_four_methods_are_registered_with_their_options():
    assert set(METHODS) <= set(TRAIN_METHODS)
    assert train_method("sltrain").option_keys == ("delta", "alpha")
    assert train_method("trp").option_keys == ("energy", "period", "nuclear")
    assert {"trp", "group_lasso", "maestro_shrink"} <= set(HOOKS)


# -- every method through the loop's protocol ----------------------------------------------
OPTIONS = {
    "lrt": {},
    "sltrain": {"delta": "0.05"},
    "maestro": {"shrink_every": "2"},
    "trp": {"period": "2", "energy": "0.9"},
}


@pytest.mark.parametrize("name", METHODS)
def test_each_method_trains_finalizes_and_round_trips(name, tmp_path):
    model = tiny_llama()
    setup = setup_for(model, param_ratio=0.5, options=OPTIONS[name])
    run = Run(name, model, setup).steps(0, 6, batches())
    assert len(run.losses) == 6 and all(math.isfinite(x) for x in run.losses)
    if name in LAYER_TYPE:
        assert {type(model.get_submodule(n)) for n in setup.targets} == {LAYER_TYPE[name]}
    summary = run.method.finalize(model, setup)
    assert summary["targets_params"] <= 0.5 * summary["targets_dense_params"]
    if name in ("maestro", "trp"):
        assert {type(model.get_submodule(n)) for n in setup.targets} == {LowRankLinear}
    ids = batches()[0]
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    rankcut.save(model, tmp_path / name, extra={"train": summary})
    loaded = rankcut.load(tmp_path / name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
@pytest.mark.parametrize("name", METHODS)
def test_param_ratio_sizes_every_method_within_the_budget(name, ratio):
    model = tiny_llama()
    setup = setup_for(model, param_ratio=ratio)
    method = train_method(name)
    method.check(setup)
    method.prepare(model, setup)
    method.hooks(model, setup)
    method.finalize(model, setup)
    stored, dense = target_params(model, setup.targets)
    assert stored <= ratio * dense
    for target in setup.targets:
        layer = model.get_submodule(target)
        m, n = layer.out_features, layer.in_features
        assert layer.weight_params() <= ratio * m * n
        if name != "sltrain":  # low rank: exactly the floor of the budget, or less (TRP)
            budget = math.floor(ratio * m * n / (m + n))
            assert layer.rank == budget if name != "trp" else layer.rank <= budget
    if name == "sltrain":  # the low rank takes what the sparse part leaves
        q = model.get_submodule(setup.targets[0])
        assert (q.rank, q.nnz) == sltrain_sizes(64, 64, 0.03, param_ratio=ratio)
        assert q.weight_params() + 64 + 64 > ratio * 64 * 64  # one more rank would not fit


def test_rank_sizes_the_factorized_methods():
    model = tiny_llama()
    setup = setup_for(model, rank=3)
    for name in ("lrt", "sltrain"):
        model = tiny_llama()
        Run(name, model, setup)
        assert {model.get_submodule(n).rank for n in setup.targets} == {3}
    sl = model.get_submodule(setup.targets[0])
    assert sl.nnz == int(0.03 * 64 * 64)


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"param_ratio": 0.0}, r"\(0, 1\]"),
        ({"param_ratio": 1.5}, r"\(0, 1\]"),
        ({"param_ratio": -0.2}, r"\(0, 1\]"),
        ({"rank": 0}, "positive"),
        ({"rank": 4, "param_ratio": 0.5}, "not both"),
        ({"options": {"bogus": "1"}}, "bogus"),
    ],
)
@pytest.mark.parametrize("name", METHODS)
def test_bad_sizing_and_unknown_options_are_one_line_errors(name, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        train_method(name).check(TrainSetup(targets=["x"], **kwargs))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, options, key",
    [
        ("sltrain", {"delta": "2"}, "delta"),
        ("sltrain", {"delta": "abc"}, "delta"),
        ("sltrain", {"alpha": "0.5"}, "alpha"),
        ("trp", {"energy": "0"}, "energy"),
        ("trp", {"period": "0"}, "period"),
        ("trp", {"nuclear": "-1"}, "nuclear"),
        ("maestro", {"lasso": "x"}, "lasso"),
        ("maestro", {"init": "pca"}, "init"),
        ("lrt", {"init": "dense"}, "init"),
    ],
)
def test_bad_option_values_are_one_line_errors(name, options, key):
    with pytest.raises(ConfigError, match=key) as err:
        train_method(name).check(TrainSetup(targets=["x"], options=options))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", METHODS)
def test_a_rank_larger_than_the_matrix_is_refused_before_anything_changes(name):
    model = tiny_llama()
    setup = setup_for(model, rank=33)  # k_proj is 32 x 64
    method = train_method(name)
    method.check(setup)
    with pytest.raises(ConfigError, match="at most 32") as err:
        method.prepare(model, setup)
    assert "\n" not in str(err.value) and "k_proj" in str(err.value)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in setup.targets)


def test_a_sparse_budget_that_leaves_no_rank_is_refused():
    model = tiny_llama()
    setup = setup_for(model, param_ratio=0.05, options={"delta": "0.05"})
    method = train_method("sltrain")
    method.check(setup)
    with pytest.raises(ConfigError, match="no low rank"):
        method.prepare(model, setup)


# -- determinism of prepare (a resumed run calls it again) ------------------------------------
@pytest.mark.parametrize("name", ["lrt", "sltrain", "maestro"])
def test_prepare_is_deterministic_from_the_seed(name):
    def prepared(seed):
        model = tiny_llama()
        setup = setup_for(
            model,
            param_ratio=0.5,
            seed=seed,
            options={"init": "random"} if name == "maestro" else {},
        )
        train_method(name).prepare(model, setup)
        return model.state_dict()

    a, b, c = prepared(0), prepared(0), prepared(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sltrain_optimizer_has_no_weight_decay():
    model = tiny_llama()
    run = Run("sltrain", model, setup_for(model, param_ratio=0.5))
    assert all(group["weight_decay"] == 0.0 for group in run.opt.param_groups)
    trained = {id(p) for group in run.opt.param_groups for p in group["params"]}
    for _, layer in factorized_modules(model):
        assert {id(layer.values), id(layer.up), id(layer.down)} <= trained
        assert not {id(b) for b in layer.buffers()} & trained


def test_lrt_svd_init_is_the_truncated_svd():
    model = tiny_llama()
    name = next(iter(find_targets(model)))
    weight = model.get_submodule(name).weight.detach().double()
    train_method("lrt").prepare(model, setup_for(model, rank=5, options={"init": "svd"}))
    u, s, vh = torch.linalg.svd(weight)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    product = model.get_submodule(name).weight_product().detach().double()
    torch.testing.assert_close(product, best, atol=1e-5, rtol=1e-4)


# -- TRP ------------------------------------------------------------------------------------
def spectrum_linear(s: list[float], n: int = 8, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    linear = nn.Linear(n, n, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_((q1[:, : len(s)] * torch.tensor(s, dtype=torch.float64)) @ q2[: len(s)])
    return linear


def test_trp_step_leaves_exactly_the_energy_threshold_rank():
    s = [4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05]
    model = nn.Sequential(spectrum_linear(s))
    # 16 + 9 + 4 = 29 of 30.33 (0.956) is the first prefix above 0.95
    assert energy_rank(torch.tensor(s), 0.95) == 3
    hook = TRPHook(["0"], energy=0.95, period=3, nuclear=0.0)
    before = model[0].weight.detach().clone()
    for step in (0, 1):
        hook.on_step(model, step)
        assert torch.equal(model[0].weight, before)  # not a truncation step
    hook.on_step(model, 2)
    assert hook.ranks == {"0": 3}
    after = torch.linalg.svdvals(model[0].weight.detach())
    torch.testing.assert_close(after[:3], torch.tensor(s[:3], dtype=torch.float64))
    assert float(after[3:].max()) < 1e-12
    assert int(torch.linalg.matrix_rank(model[0].weight.detach())) == 3
    # the truncation is the best rank-3 approximation
    u, sv, vh = torch.linalg.svd(before)
    torch.testing.assert_close(model[0].weight.detach(), (u[:, :3] * sv[:3]) @ vh[:3])


def test_trp_budget_caps_the_rank():
    model = nn.Sequential(spectrum_linear([4.0, 3.0, 2.0, 1.0, 0.5]))
    hook = TRPHook(["0"], energy=0.999, period=1, max_ranks={"0": 2})
    hook.on_step(model, 0)
    assert hook.ranks == {"0": 2}
    assert int(torch.linalg.matrix_rank(model[0].weight.detach())) == 2


def test_trp_nuclear_subgradient_is_added_on_period_steps():
    s = [4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05]
    model = nn.Sequential(spectrum_linear(s))
    hook = TRPHook(["0"], energy=0.95, period=2, nuclear=0.1)
    weight = model[0].weight
    weight.grad = torch.zeros_like(weight)
    hook.on_backward(model, 1)  # not a period step
    assert torch.count_nonzero(weight.grad) == 0
    hook.on_backward(model, 2)
    u, _, vh = torch.linalg.svd(weight.detach())
    torch.testing.assert_close(weight.grad, 0.1 * u[:, :3] @ vh[:3])  # lambda U_k V_k^T
    # after a truncation the sub-gradient keeps the truncation's rank
    hook.on_step(model, 3)
    weight.grad = torch.zeros_like(weight)
    hook.on_backward(model, 4)
    u, _, vh = torch.linalg.svd(weight.detach())
    torch.testing.assert_close(weight.grad, 0.1 * u[:, :3] @ vh[:3])


def test_trp_on_conv1d_truncates_the_logical_weight():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 8)  # in 8 -> out 6, weight stored (8, 6)
    with torch.no_grad():
        conv.weight.copy_(spectrum_linear([3.0, 2.0, 1.0, 0.1], n=8).weight[:, :6])
    model = nn.Sequential(conv)
    hook = TRPHook(["0"], energy=0.9, period=1)
    hook.on_step(model, 0)
    assert int(torch.linalg.matrix_rank(conv.weight.detach())) == hook.ranks["0"] < 6


def test_trp_finalize_factorizes_at_the_reached_rank_without_loss():
    model = tiny_llama()
    setup = setup_for(model, options={"period": "2", "energy": "0.8", "nuclear": "0"})
    run = Run("trp", model, setup).steps(0, 4, batches())  # step 3 truncates last
    reached = dict(run.method.state_dict()["ranks"])
    assert set(reached) == set(setup.targets)
    for name, rank in reached.items():
        weight = model.get_submodule(name).weight.detach()
        assert int(torch.linalg.matrix_rank(weight)) == rank
    ids = batches()[0]
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    summary = run.method.finalize(model, setup)
    assert summary["reached_ranks"] == reached
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)
    for name, rank in reached.items():
        layer = model.get_submodule(name)
        if name in summary["kept_dense"]:
            assert isinstance(layer, nn.Linear)
            m, n = layer.weight.shape
            assert rank * (m + n) >= m * n
        else:
            assert isinstance(layer, LowRankLinear) and layer.rank == rank
    assert summary["final_truncation_error_max"] < 1e-4


# -- Maestro ----------------------------------------------------------------------------------
def test_maestro_samples_one_layer_prefix_per_step_deterministically():
    model = tiny_llama()
    setup = setup_for(model)
    method = train_method("maestro")
    method.prepare(model, setup)
    other = train_method("maestro")
    other.prepare(tiny_llama(), setup)
    picks = [method.sample(model, step) for step in range(200)]
    assert picks == [other.sample(model, step) for step in range(200)]
    assert all(1 <= k <= model.get_submodule(n).rank for n, k in picks)
    assert len({n for n, _ in picks}) > 7  # many layers, not one


def test_maestro_loss_is_lm_loss_plus_distillation_of_the_cut_network():
    model = tiny_llama()
    setup = setup_for(model)
    method = train_method("maestro")
    method.prepare(model, setup)
    ids = batches()[0]
    name, rank = method.sample(model, 5)
    with torch.no_grad():
        loss = method.loss(model, ids, 5)
        full = model(input_ids=ids, labels=ids)
        layer = model.get_submodule(name)
        layer.active_rank = rank
        partial = model(input_ids=ids).logits
        layer.active_rank = None
    expected = full.loss + distillation_loss(partial, full.logits)
    torch.testing.assert_close(loss, expected)
    assert all(model.get_submodule(n).active_rank is None for n in setup.targets)


def test_maestro_warmup_trains_uncut_first():
    """``warmup=0.5``: the first half of the steps' loss is the uncut network's alone,
    the second half adds the distillation of the sampled cut, as without warmup."""
    model = tiny_llama()
    setup = setup_for(model, steps=10, options={"warmup": 0.5})
    plain, too_long = setup_for(model, steps=10), setup_for(model, options={"warmup": 1.0})
    reference = train_method("maestro")
    reference.prepare(copy.deepcopy(model), plain)
    method = train_method("maestro")
    method.prepare(model, setup)
    ids = batches()[0]
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids).loss
        for step in range(5):
            torch.testing.assert_close(method.loss(model, ids, step), full)
        for step in range(5, 10):
            loss = method.loss(model, ids, step)
            assert float(loss) > float(full)  # (a distillation term is added)
            torch.testing.assert_close(loss, reference.loss(model, ids, step))
    with pytest.raises(ConfigError):
        train_method("maestro").parse_options(too_long)


def test_maestro_sampler_all_cuts_every_layer_at_one_fraction():
    """``sampler=all``: each step cuts every layer to ``ceil(p * full rank)`` for one
    ``p`` drawn from (seed, step); the loss distills the network cut that way."""
    import math

    model = tiny_llama()
    setup = setup_for(model, options={"sampler": "all"})
    method = train_method("maestro")
    method.prepare(model, setup)
    fractions = set()
    for step in range(20):
        cuts = method.cuts(model, step)
        assert set(cuts) == set(setup.targets)
        layers = {n: model.get_submodule(n) for n in cuts}
        # one p for all: each rank is ceil(p * full) for a p in the same interval
        lo = max((cuts[n] - 1) / min(layers[n].in_features, layers[n].out_features) for n in cuts)
        hi = min(cuts[n] / min(layers[n].in_features, layers[n].out_features) for n in cuts)
        assert lo < hi + 1e-12
        fractions.add(round(hi, 3))
        assert cuts == method.sample_all(model, step)  # deterministic
    assert len(fractions) > 5
    ids = batches()[0]
    with torch.no_grad():
        loss = method.loss(model, ids, 3)
        full = model(input_ids=ids, labels=ids)
        for n, k in method.cuts(model, 3).items():
            model.get_submodule(n).active_rank = k
        partial = model(input_ids=ids).logits
        for n in setup.targets:
            model.get_submodule(n).active_rank = None
    torch.testing.assert_close(loss, full.loss + distillation_loss(partial, full.logits))
    assert all(model.get_submodule(n).active_rank is None for n in setup.targets)
    assert math.isfinite(float(loss))


def test_maestro_svd_init_reproduces_the_model():
    model = tiny_llama()
    ids = batches()[0]
    with torch.no_grad():
        before = model(ids).logits
    train_method("maestro").prepare(model, setup_for(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_maestro_shrinks_during_training_and_keeps_training():
    model = tiny_llama()
    options = {"shrink_every": "2", "shrink_threshold": "1e9"}  # everything falls below
    setup = setup_for(model, options=options)
    run = Run("maestro", model, setup).steps(0, 2, batches())
    assert {model.get_submodule(n).rank for n in setup.targets} == {1}
    for name in setup.targets:
        layer = model.get_submodule(name)
        for p in (layer.up, layer.down):
            assert run.opt.state[p]["exp_avg"].shape == p.shape
    run.steps(2, 4, batches())
    assert all(math.isfinite(x) for x in run.losses)
    summary = run.method.finalize(model, setup)
    assert set(summary["trained_ranks"].values()) == {1} and not summary["cut"]
    assert {e["layer"] for e in summary["shrinking"]} == set(setup.targets)
    assert {(e["step"], e["to"]) for e in summary["shrinking"]} == {(1, 1)}
    assert {type(model.get_submodule(n)) for n in setup.targets} == {MaestroLinear}


def test_maestro_cut_cuts_ordered_layers_at_a_fraction():
    model = tiny_llama()
    train_method("maestro").prepare(model, setup_for(model))
    ranks = maestro_cut(model, fraction=0.1)
    assert set(ranks.values()) == {4, 7}  # ceil(0.1 * 32), ceil(0.1 * 64)
    assert not any(isinstance(m, MaestroLinear) for m in model.modules())
    with pytest.raises(ConfigError):
        maestro_cut(model, fraction=1.5)


# -- resume equals the uninterrupted run ------------------------------------------------------
@pytest.mark.parametrize(
    "name, options",
    [
        ("maestro", {"shrink_every": "2", "shrink_threshold": "1e9"}),
        ("trp", {"period": "2", "energy": "0.9"}),
        ("sltrain", {}),
    ],
)
def test_a_resumed_run_equals_the_uninterrupted_one(name, options):
    data = batches()
    setup = setup_for(tiny_llama(), param_ratio=0.5, options=options)
    whole = Run(name, tiny_llama(), setup).steps(0, 6, data)

    first = Run(name, tiny_llama(), setup).steps(0, 3, data)
    saved = first.checkpoint()
    resumed = Run(name, tiny_llama(), setup)
    resumed.model.load_state_dict(saved["model"])
    resumed.opt.load_state_dict(saved["optimizer"])
    resumed.method.load_state_dict(saved["method"])
    resumed.steps(3, 6, data)

    assert first.losses + resumed.losses == whole.losses
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.method.state_dict() == resumed.method.state_dict()
