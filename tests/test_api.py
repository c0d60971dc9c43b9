"""The verb and its plan: ``compress`` = ``make_plan`` + the registered pipeline."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import rankcut
from rankcut.errors import ConfigError, RankcutError
from rankcut.methods import FwsvdConfig, SvdConfig, SvdLlmConfig
from rankcut.pipelines import PIPELINES, config_pipelines, make_plan, register_pipeline

from .conftest import tiny_llama


def calib(n=4, seq=16):
    return torch.randint(3, 400, (n, seq), generator=torch.Generator().manual_seed(3))


def test_compress_factorizes_exactly_what_the_plan_says():
    model, x = tiny_llama(), calib()
    config = SvdLlmConfig(ratio=0.4, allocation="global", pipeline="auto")
    plan = make_plan(copy.deepcopy(model), config, x, progress=False)
    result = rankcut.compress(model, config, x, progress=False)
    assert plan.config.pipeline == result.config.pipeline == "sequential"
    assert result.ranks == plan.final_ranks and result.kept_dense == plan.kept
    for name, rank in result.ranks.items():
        assert model.get_submodule(name).rank == rank
    assert result.params == model.rankcut_meta["params"]
    assert set(result.extra["phases"]) == {"statistics", "allocation", "factorization"}


def test_plan_changes_nothing_in_the_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(model, SvdConfig(ratio=0.5, allocation="uniform"), progress=False)
    assert plan.todo and plan.pipeline.name == "whole"
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_registered_pipeline_is_run_by_compress_without_editing_api(monkeypatch):
    calls = []

    @register_pipeline("recording-test")
    def run(model, plan, calibration, *, progress=True):
        calls.append(sorted(plan.todo))
        PIPELINES["whole"].run(model, plan, calibration, progress=progress)

    try:
        assert "recording-test" in config_pipelines()
        config = SvdConfig(ratio=0.5, allocation="uniform", pipeline="recording-test")
        result = rankcut.compress(tiny_llama(), config, progress=False)
        assert calls == [sorted(result.ranks)] and len(result.ranks) == 14
    finally:
        PIPELINES.pop("recording-test")
    with pytest.raises(ConfigError, match="pipeline must be one of"):
        SvdConfig(pipeline="recording-test")


def test_streaming_plan_falls_back_from_the_default_allocation_only(caplog):
    model, x = tiny_llama(), calib()
    with caplog.at_level(logging.WARNING):
        plan = make_plan(model, SvdLlmConfig(), x, pipeline="streaming", allocation_given=False)
    assert plan.config.allocation == "uniform" and "using 'uniform'" in caplog.text
    uniform = make_plan(model, SvdLlmConfig(allocation="uniform"), x, pipeline="streaming")
    assert plan.final_ranks == uniform.final_ranks
    with pytest.raises(RankcutError, match="needs ranks before it loads the first layer"):
        make_plan(model, SvdLlmConfig(), x, pipeline="streaming", allocation_given=True)
    with pytest.raises(RankcutError, match="needs loss gradients"):
        make_plan(model, FwsvdConfig(allocation="uniform"), x, pipeline="streaming")
    with pytest.raises(RankcutError, match="needs calibration data"):
        make_plan(model, SvdLlmConfig(allocation="uniform"), None, pipeline="streaming")


def test_streaming_plan_reads_only_structure():
    """The streaming pipeline plans on a skeleton whose parameters are on meta."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    real = tiny_llama()
    with init_empty_weights():
        skeleton = LlamaForCausalLM(real.config)
    config = SvdLlmConfig(ratio=0.3, allocation="uniform")
    plan = make_plan(skeleton, config, calib(), pipeline="streaming")
    assert plan.final_ranks == make_plan(real, config, calib(), progress=False).final_ranks
    assert plan.stats is None


def test_collect_statistics_serves_compress_at_two_ratios():
    model, x = tiny_llama(), calib()
    config = SvdLlmConfig(ratio=0.3, allocation="global", pipeline="whole")
    stats = rankcut.collect_statistics(model, config, x, progress=False)
    for ratio in (0.3, 0.5):
        cfg = SvdLlmConfig(ratio=ratio, allocation="global", pipeline="whole")
        reused = rankcut.compress(copy.deepcopy(model), cfg, x, progress=False, stats=stats)
        fresh = rankcut.compress(copy.deepcopy(model), cfg, x, progress=False)
        assert reused.ranks == fresh.ranks
    assert all(v is not None for v in stats.values())  # the caller's dict is untouched
