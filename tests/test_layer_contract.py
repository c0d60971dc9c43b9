"""The one contract of every factorized layer, checked on every registered layer type.

``macs(tokens)`` against the multiply-adds its forward really executes (counted from the
dispatched aten ops, ``tests/macs_count.py``), what it trains and what an adapter may
wrap, the registry, and LoRA recovery on a tiny Llama made of that layer type.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rankcut.errors import RankcutError
from rankcut.finetune import RecoveryConfig, recover
from rankcut.layers import (
    LAYER_TYPES,
    FactorizedLinear,
    KroneckerLinear,
    LowRankLinear,
    factorized_modules,
    register_layer,
)

from .layer_zoo import LAYER_NAMES, compressed_llama, example_layer, layer_methods
from .macs_count import count_macs

#: One token (decoding), a few (SparseDenseLinear gathers up to 8), and a batch large
#: enough for every path a layer switches to (KroneckerLinear rebuilds W' here).
TOKENS = (1, 3, 64)


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_layer_type_is_built_by_a_method(name):
    assert name in layer_methods(), f"no registered method builds {name}"
    assert issubclass(LAYER_TYPES[name], FactorizedLinear)


# -- multiply-adds ----------------------------------------------------------------------
@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_macs_equal_the_multiply_adds_the_forward_executes(name, tokens):
    layer = example_layer(name)
    x = torch.randn(1, tokens, layer.in_features, dtype=torch.float64)
    counted = count_macs(layer, x)
    assert layer.macs(tokens) == counted.macs, counted.products


def test_kronecker_macs_follow_the_rebuild_rule():
    """Below the cut the factors, from the cut on ``K m n`` once plus the dense product."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(12, 4, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(12, 6, 6, generator=gen, dtype=torch.float64)
    layer = KroneckerLinear.from_parts(a, b, rank=3)
    m, n = layer.out_features, layer.in_features
    cut = next(t for t in range(1, 1000) if layer.rebuilds_for(t))
    for tokens in (1, cut - 1, cut, 3 * cut):
        counted = count_macs(layer, torch.randn(tokens, n, dtype=torch.float64)).macs
        assert layer.macs(tokens) == counted
    assert layer.macs(cut - 1) == (cut - 1) * layer.factored_macs()
    assert layer.macs(cut) == (12 + cut) * m * n < cut * layer.factored_macs()


@pytest.mark.parametrize(
    "shape",
    [
        (3, 2, 3, 4, 5),  # m1 n2 < n1 m2: contracts with A first
        (3, 4, 5, 2, 3),  # contracts with B first
        (3, 2, 1, 11, 5),  # A first (the smaller intermediate), though B first is cheaper
    ],
)
def test_kronecker_macs_count_the_contraction_order_the_forward_takes(shape):
    k, m1, n1, m2, n2 = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(k, m1, n1, generator=gen, dtype=torch.float64)
    b = torch.randn(k, m2, n2, generator=gen, dtype=torch.float64)
    layer = KroneckerLinear.from_parts(a, b, rank=1)
    layer.allow_rebuild = False
    counted = count_macs(layer, torch.randn(5, n1 * n2, dtype=torch.float64)).macs
    assert layer.macs(5) == 5 * layer.factored_macs() == counted


def test_the_counter_agrees_with_torchs_flop_counter_where_both_count():
    """FlopCounterMode counts mm/addmm/bmm (2 FLOPs a multiply-add): the same totals."""
    torch.manual_seed(0)
    dense, lowrank = nn.Linear(16, 24), LowRankLinear(16, 24, rank=5)
    x = torch.randn(2, 7, 16)
    for fn in (dense, lowrank, lambda t: torch.bmm(t, t.transpose(1, 2))):
        flops = FlopCounterMode(display=False)
        with torch.no_grad(), flops:
            fn(x)
        assert count_macs(fn, x).macs * 2 == flops.get_total_flops() > 0


# -- what trains, what an adapter wraps, the counts --------------------------------------
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_trainable_parameters_adapter_targets_and_counts(name):
    layer = example_layer(name)
    trained = layer.trainable_parameters()
    assert trained and all(p.is_floating_point() for p in trained)
    assert {id(p) for p in trained} == {id(p) for p in layer.parameters()}
    indices = [b for b in layer.buffers() if not b.is_floating_point()]
    assert not {id(b) for b in indices} & {id(p) for p in trained}
    for rel, module in layer.adapter_targets().items():
        assert layer.get_submodule(rel) is module
    assert layer.has_bias() and layer.bias.shape == (layer.out_features,)
    assert layer.weight_params() == layer.num_params() - layer.out_features
    assert layer.dense_params() == layer.out_features * (layer.in_features + 1)
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer.to_linear()(x), layer(x))


def test_which_layer_types_have_adapter_targets():
    """LowRankLinear's factors are nn.Linear modules; the structured layers hold plain
    parameters (LoRA recovery trains those directly, see the recovery tests)."""
    having = {name for name in LAYER_NAMES if example_layer(name).adapter_targets()}
    assert having == {"LowRankLinear"}
    assert set(LowRankLinear(4, 4, rank=1).adapter_targets()) == {"down", "up"}


def test_register_layer_rejects_other_classes_and_taken_names():
    before = dict(LAYER_TYPES)
    with pytest.raises(TypeError, match="FactorizedLinear"):
        register_layer(nn.Linear)
    impostor = type("LowRankLinear", (LowRankLinear,), {})
    with pytest.raises(ValueError, match="already registered"):
        register_layer(impostor)
    assert LAYER_TYPES == before
    assert register_layer(LowRankLinear) is LowRankLinear  # registering again is a no-op

    class NoMacs(FactorizedLinear):  # a layer that forgot part of the contract
        def weight_product(self):
            return torch.zeros(2, 2)

    with pytest.raises(TypeError, match="macs"):
        NoMacs(2, 2, 1)


def test_factorized_modules_finds_every_registered_type():
    model = nn.Sequential(*(example_layer(name) for name in LAYER_NAMES), nn.Linear(2, 2))
    found = factorized_modules(model)
    assert [type(m).__name__ for _, m in found] == LAYER_NAMES
    assert [n for n, _ in found] == [str(i) for i in range(len(LAYER_NAMES))]


# -- recovery with LoRA -------------------------------------------------------------------
def pattern_windows(n: int = 4, seq: int = 32) -> torch.Tensor:
    # Every token has one successor (a cycle of 8): a loss that a few steps lower.
    cycle = torch.arange(3, 11)
    return torch.stack([cycle.roll(-i).repeat(seq // 8) for i in range(n)])


def factor_state(model) -> dict[str, dict[str, torch.Tensor]]:
    """Each factorized layer's state dict (copied), by layer name."""
    return {
        n: {k: v.detach().clone() for k, v in layer.state_dict().items()}
        for n, layer in factorized_modules(model)
    }


def changed_layers(model, before) -> set[str]:
    after = factor_state(model)
    assert after.keys() == before.keys()
    for n, state in after.items():
        assert state.keys() == before[n].keys(), n
        for k, v in state.items():  # indices (integer buffers) never move
            assert v.is_floating_point() or torch.equal(v, before[n][k]), (n, k)
    return {
        n
        for n, state in after.items()
        if any(not torch.equal(v, before[n][k]) for k, v in state.items())
    }


def structures(model) -> dict[str, dict]:
    return {n: m.structure() for n, m in factorized_modules(model)}


def assert_trained_and_kept_structure(model, before_state, before_structure) -> set[str]:
    """The structure is the one before, no adapter is left, and some factor moved;
    returns the names of the layers that changed."""
    assert structures(model) == before_structure
    assert not any("lora" in n for n, _ in model.named_modules())
    changed = changed_layers(model, before_state)
    assert changed
    return changed


RECOVERY = {"steps": 3, "lr": 1e-2, "warmup": 1, "distill": 0.0}


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_lora_recovery_trains_or_says_why_not(name):
    """With adapter targets, LoRA trains and merges back; without, one clear error that
    points to ``lora_rank=0``, which then trains the factors directly."""
    pytest.importorskip("peft")
    model = compressed_llama(name)
    state, shape = factor_state(model), structures(model)
    lora = RecoveryConfig(**RECOVERY, lora_rank=2)
    if any(m.adapter_targets() for _, m in factorized_modules(model)):
        recover(model, pattern_windows(), lora, progress=False)
        assert_trained_and_kept_structure(model, state, shape)
        return
    with pytest.raises(RankcutError) as err:
        recover(model, pattern_windows(), lora, progress=False)
    message = str(err.value)
    assert "\n" not in message and name in message and "lora_rank=0" in message
    assert all(p.requires_grad for p in model.parameters())  # left as it was
    assert factor_state(model).keys() == state.keys()
    recover(model, pattern_windows(), RecoveryConfig(**RECOVERY), progress=False)
    assert_trained_and_kept_structure(model, state, shape)


def test_lora_recovery_of_a_mixed_model_trains_both_kinds():
    """LoRA on the LowRankLinear factors; the structured layers train their own factors."""
    pytest.importorskip("peft")
    model = compressed_llama("CURLinear")
    mlp = model.model.layers[0].mlp
    for key in ("gate_proj", "up_proj"):
        setattr(mlp, key, LowRankLinear.from_linear(getattr(mlp, key).to_linear(), rank=4))
    state, shape = factor_state(model), structures(model)
    recover(model, pattern_windows(), RecoveryConfig(**RECOVERY, lora_rank=2), progress=False)
    changed = assert_trained_and_kept_structure(model, state, shape)
    assert {type(model.get_submodule(n)).__name__ for n in changed} == {
        "LowRankLinear",
        "CURLinear",
    }
