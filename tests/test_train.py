"""Training-time hooks: a plain loop and the transformers Trainer callback."""

from __future__ import annotations

import pytest
import torch

from rankcut.errors import ConfigError
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


def test_register_hook_takes_hook_classes_only():
    @register_hook("recorder-test")
    class Rec(_Recorder):
        pass

    assert HOOKS.pop("recorder-test") is Rec
    with pytest.raises(ConfigError):
        register_hook("bad")(object)
