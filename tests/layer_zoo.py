"""One example of every registered layer type, built by the method that makes it.

The contract tests parametrize over ``LAYER_NAMES`` (every entry of
``rankcut.layers.LAYER_TYPES``), so a newly registered layer is tested as soon as a
method builds it; one that no method builds fails with a message saying so. The layers
that only training builds (``rankcut.train``: SLTrain, Maestro) are in
``TRAINING_LAYERS``, with the training method whose ``prepare`` makes them.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import rankcut
from rankcut.calibrate import InputStats, LayerStats
from rankcut.layers import LAYER_TYPES, FactorizedLinear, factorized_modules
from rankcut.methods import METHODS

#: Every registered layer type, by class name.
LAYER_NAMES = sorted(LAYER_TYPES)


def gram_stats(n: int, seed: int = 0) -> LayerStats:
    """Calibration statistics (a Gram) of ``n`` input channels of unequal scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8 * n, n, generator=gen, dtype=torch.float64)
    stats = InputStats(n)
    stats.update(x * torch.linspace(0.3, 3.0, n, dtype=torch.float64))
    return LayerStats(inputs=stats)


def _make(method: str, out_features: int, in_features: int, rank: int, seed: int):
    spec = METHODS[method]
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_features, generator=gen, dtype=torch.float64)
    config = spec.config_cls(allocation="uniform")
    stats = gram_stats(in_features, seed)
    return spec.make_layer(weight, stats, rank, config, "layer", bias=bias, dtype=torch.float64)


#: Layer types that only a training method builds -> that method (``rankcut.train``).
TRAINING_LAYERS = {"SLTrainLinear": "sltrain", "MaestroLinear": "maestro"}

#: How ``layer_methods`` names a training method (not a compression method).
TRAIN_PREFIX = "train:"


def _make_training_layer(name: str, out_features: int, in_features: int, rank: int, seed: int):
    """A float64 training layer with a bias and every tensor nonzero (SLTrain's ``B``
    starts at zero in the authors' init; here it is random so that it shows)."""
    from rankcut.layers import MaestroLinear, SLTrainLinear
    from rankcut.layers.linear import linear_from

    gen = torch.Generator().manual_seed(seed)
    if name == "SLTrainLinear":
        nnz = out_features * in_features // 10
        layer = SLTrainLinear.from_scratch(
            in_features, out_features, rank, nnz, alpha=8, generator=gen, dtype=torch.float64
        )
        with torch.no_grad():
            layer.up.normal_(generator=gen)
            layer.bias.normal_(generator=gen)
        return layer
    weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_features, generator=gen, dtype=torch.float64)
    return MaestroLinear.from_linear(linear_from(weight, bias), rank)


@functools.cache
def layer_methods() -> dict[str, str]:
    """Layer type name -> the first method (by name) that builds it from a Gram alone,
    or ``train:<method>`` for the layers of ``TRAINING_LAYERS``."""
    found: dict[str, str] = {}
    for method in sorted(METHODS):
        if METHODS[method].needs <= {"gram"}:
            found.setdefault(type(_make(method, 24, 16, 6, 0)).__name__, method)
    for name, method in TRAINING_LAYERS.items():
        found.setdefault(name, TRAIN_PREFIX + method)
    return found


def method_for(name: str) -> str:
    """The method that builds layer type ``name`` (fails the test when there is none)."""
    method = layer_methods().get(name)
    if method is None:
        pytest.fail(f"no method builds {name} from a Gram: give tests/layer_zoo.py a builder")
    return method


def example_layer(
    name: str, out_features: int = 24, in_features: int = 16, rank: int = 6, seed: int = 0
) -> FactorizedLinear:
    """A float64 layer of type ``name`` with a bias, fitted to a random weight (a
    training layer: initialised as its training method does, every tensor nonzero)."""
    method = method_for(name)
    if method.startswith(TRAIN_PREFIX):
        layer = _make_training_layer(name, out_features, in_features, rank, seed)
    else:
        layer = _make(method, out_features, in_features, rank, seed)
    assert type(layer).__name__ == name
    return layer


#: The smallest Llama of the contract tests: one block, hidden 32, vocabulary 100.
TINY_LLAMA_32 = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}


def tiny_llama_32(seed: int = 0):
    """A ``LlamaForCausalLM`` of ``TINY_LLAMA_32``, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_32)).eval()


def token_windows(n: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """``(n, seq)`` random token ids of ``tiny_llama_32``'s vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (n, seq), generator=gen)


def _prepared_for_training(name: str):
    """``tiny_llama_32`` prepared by the training method that builds ``name``."""
    from rankcut.models.structure import find_targets
    from rankcut.train.methods import TrainSetup, train_method

    model = tiny_llama_32()
    method = train_method(method_for(name).removeprefix(TRAIN_PREFIX))
    setup = TrainSetup(targets=list(find_targets(model)), param_ratio=0.5)
    method.check(setup)
    method.prepare(model, setup)
    return model.eval()


@functools.cache
def _compressed(name: str):
    if method_for(name).startswith(TRAIN_PREFIX):
        return _prepared_for_training(name)
    model = tiny_llama_32()
    config = METHODS[method_for(name)].config_cls(
        ratio=0.5, allocation="uniform", pipeline="whole", rank_multiple=1, min_speedup=1.0
    )
    rankcut.compress(model, config, token_windows(), progress=False)
    return model


def compressed_llama(name: str):
    """A fresh copy of ``tiny_llama_32`` whose linears are layers of type ``name``."""
    model = copy.deepcopy(_compressed(name))
    layers = [type(m).__name__ for _, m in factorized_modules(model)]
    assert layers and set(layers) == {name}, layers
    return model
