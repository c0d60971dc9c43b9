"""The registries of the capabilities to come: training hooks, adapters, quantizers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.adapters import ADAPTER_METHODS, get_adapter_method, register_adapter_method
from rankcut.decompose.quantize import absmax_quantize, dequantize
from rankcut.errors import ConfigError
from rankcut.quant import QUANTIZERS, get_quantizer
from rankcut.train import HOOKS, TrainingHook, as_trainer_callback, register_hook


class _Recorder(TrainingHook):
    def __init__(self):
        self.calls = []

    def on_backward(self, model, step):
        self.calls.append(("backward", step, model.weight.grad is not None))

    def on_step(self, model, step):
        self.calls.append(("step", step))


def test_training_hook_runs_in_a_plain_loop_and_as_trainer_callback():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = _Recorder()
    for step in range(2):
        model(torch.randn(4, 3)).sum().backward()
        hook.on_backward(model, step)
        opt.step()
        hook.on_step(model, step)
        opt.zero_grad()
    assert hook.calls == [("backward", 0, True), ("step", 0), ("backward", 1, True), ("step", 1)]

    from transformers import TrainerControl, TrainerState, TrainingArguments

    callback = as_trainer_callback(hook)
    state = TrainerState()
    state.global_step = 7
    args = TrainingArguments(output_dir="/tmp/unused", report_to=[])
    model(torch.randn(4, 3)).sum().backward()
    callback.on_pre_optimizer_step(args, state, TrainerControl(), model=model)
    callback.on_step_end(args, state, TrainerControl(), model=model)
    assert hook.calls[-2:] == [("backward", 7, True), ("step", 7)]


def test_registries_register_and_refuse_unknown_names():
    @register_hook("recorder-test")
    class Rec(_Recorder):
        pass

    assert HOOKS.pop("recorder-test") is Rec
    with pytest.raises(ConfigError):
        register_hook("bad")(object)

    @register_adapter_method("noop-test", dict)
    def inject(model, config):
        return model

    assert get_adapter_method("noop-test").inject is inject
    ADAPTER_METHODS.pop("noop-test")
    with pytest.raises(ConfigError, match="unknown adapter"):
        get_adapter_method("noop-test")
    with pytest.raises(ConfigError, match="unknown quantizer"):
        get_quantizer("int3-nope")
    assert {"int8", "int4"} <= set(QUANTIZERS)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_absmax_round_trip_error_is_at_most_half_a_step(bits, seed):
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w[2] = 0.0  # an all-zero row stays exactly zero
    codes, scale = absmax_quantize(w, bits)
    top = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= top
    err = (dequantize(codes, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-12)
    assert torch.equal(dequantize(codes, scale)[2], torch.zeros(7, dtype=torch.float64))
    # each non-zero row's largest entry is represented exactly (it maps to +-top)
    assert torch.all(codes.abs().amax(dim=1)[[0, 1, 3, 4]] == top)


def test_quantizer_round_trip_matches_its_bits():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    e8 = (get_quantizer("int8").round_trip(w) - w).norm()
    e4 = (get_quantizer("int4").round_trip(w) - w).norm()
    assert 0 < e8 < e4 < w.norm() / 4
