"""Model discovery: the default adapter on HF models, registered adapters, and a model
that is no transformers model compressed end to end through its adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankcut
from rankcut.errors import RankcutError
from rankcut.models import (
    ModelAdapter,
    adapter_for,
    find_decoder_layers,
    find_targets,
    register_adapter,
    unregister_adapter,
)

from .conftest import TINY_MODELS, tiny_llama
from .custom_lm import TokenLM, TokenLMAdapter, token_lm

EXPECTED = {
    "llama": {
        "blocks": ["model.layers.0", "model.layers.1"],
        "block_type": "LlamaDecoderLayer",
        "embeddings": ["model.embed_tokens"],
        "head": "lm_head",
    },
    "gpt2": {
        "blocks": ["transformer.h.0", "transformer.h.1"],
        "block_type": "GPT2Block",
        "embeddings": ["transformer.wte", "transformer.wpe"],
        "head": "lm_head",
    },
    "bert": {
        "blocks": ["encoder.layer.0", "encoder.layer.1"],
        "block_type": "BertLayer",
        "embeddings": [
            "embeddings.word_embeddings",
            "embeddings.position_embeddings",
            "embeddings.token_type_embeddings",
        ],
        "head": None,  # a base encoder has no output head
    },
}


@pytest.fixture
def token_lm_adapter():
    register_adapter(TokenLM)(TokenLMAdapter)
    yield TokenLMAdapter
    unregister_adapter(TokenLMAdapter)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_default_adapter_finds_blocks_embeddings_and_head(arch):
    model = TINY_MODELS[arch]()
    adapter = adapter_for(model)
    want = EXPECTED[arch]
    assert type(adapter) is ModelAdapter
    assert [n for n, _ in adapter.blocks()] == want["blocks"]
    assert {type(m).__name__ for _, m in adapter.blocks()} == {want["block_type"]}
    assert all(model.get_submodule(n) is m for n, m in adapter.blocks())
    embeddings = adapter.embeddings()
    assert [n for n, _ in embeddings] == want["embeddings"]
    assert embeddings[0][1] is model.get_input_embeddings()
    head = adapter.head()
    assert (head and head[0]) == want["head"]
    if head:
        assert head[1] is model.get_output_embeddings()
    assert adapter.input_name == "input_ids"
    assert find_decoder_layers(model) == adapter.blocks()


def test_default_adapter_prefers_declared_blocks_over_longer_lists():
    """``_no_split_modules`` names the blocks even when another list is longer."""

    class Tap(nn.Identity):
        pass

    class Net(nn.Module):
        _no_split_modules = ["Linear"]

        def __init__(self):
            super().__init__()
            self.taps = nn.ModuleList([Tap() for _ in range(5)])
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])

    assert [n for n, _ in adapter_for(Net()).blocks()] == ["blocks.0", "blocks.1"]
    Net._no_split_modules = []
    assert [n for n, _ in adapter_for(Net()).blocks()][0] == "taps.0"  # the longest list


def test_registered_adapters_come_first_newest_first():
    model = token_lm()
    assert find_decoder_layers(model) == []  # the default sees no block in a Sequential
    register_adapter(TokenLM)(TokenLMAdapter)

    @register_adapter(lambda m: getattr(m, "flavour", None) == "other")
    class Other(ModelAdapter):
        input_name = "other_ids"

    try:
        assert type(adapter_for(model)) is TokenLMAdapter
        assert [n for n, _ in find_decoder_layers(model)] == ["body.0", "body.1", "body.2"]
        model.flavour = "other"
        assert type(adapter_for(model)) is Other  # the newest match wins
        assert adapter_for(model).input_name == "other_ids"
    finally:
        unregister_adapter(Other)
        unregister_adapter(TokenLMAdapter)
    assert type(adapter_for(model)) is ModelAdapter
    assert type(adapter_for(TINY_MODELS["llama"]())) is ModelAdapter
    with pytest.raises(TypeError, match="ModelAdapter subclass"):
        register_adapter(TokenLM)(object)


def test_registered_adapter_replaces_the_default():
    """A registration keyed on a transformers class changes what that family reports."""
    from transformers import GPT2LMHeadModel

    @register_adapter(GPT2LMHeadModel)
    class FirstBlockOnly(ModelAdapter):
        def blocks(self):
            return super().blocks()[:1]

    try:
        assert [n for n, _ in find_decoder_layers(TINY_MODELS["gpt2"]())] == ["transformer.h.0"]
        assert len(find_decoder_layers(TINY_MODELS["llama"]())) == 2
    finally:
        unregister_adapter(FirstBlockOnly)
    assert len(find_decoder_layers(TINY_MODELS["gpt2"]())) == 2


def test_inputs_name_the_token_argument_and_keep_what_the_forward_takes(token_lm_adapter):
    ids = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.ones_like(ids)
    custom = adapter_for(token_lm()).inputs(ids, attention_mask=mask, use_cache=False)
    assert custom.keys() == {"tokens"} and custom["tokens"] is ids
    hf = adapter_for(TINY_MODELS["llama"]()).inputs(ids, attention_mask=mask, use_cache=False)
    assert hf.keys() == {"input_ids", "attention_mask", "use_cache"}  # HF takes **kwargs
    unregister_adapter(token_lm_adapter)
    with pytest.raises(RankcutError, match="no argument 'input_ids'.*register a ModelAdapter"):
        adapter_for(token_lm()).inputs(ids)


def test_custom_model_is_compressed_end_to_end_through_its_adapter(token_lm_adapter):
    """A model with no ``_no_split_modules`` and a ``tokens=`` forward: its adapter alone
    makes it calibrate and compress with the sequential pipeline."""
    model = token_lm()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 64, (8, 24), generator=gen)
    probe = torch.randint(0, 64, (2, 24), generator=gen)
    with torch.no_grad():
        dense_logits = model(tokens=probe)
    targets = find_targets(model)
    assert sorted(targets) == sorted(
        f"body.{i}.{n}" for i in range(3) for n in ("mix", "up", "down")
    )  # the head and the embeddings lie outside the blocks
    config = rankcut.methods.SvdLlmConfig(ratio=0.5, allocation="uniform", pipeline="sequential")
    result = rankcut.compress(model, config, calib, progress=False)
    assert sorted(result.ranks) == sorted(targets)
    assert result.params["targeted_after"] <= 0.5 * result.params["targeted_before"] + 1
    for name in targets:
        assert isinstance(model.get_submodule(name), rankcut.LowRankLinear)
    with torch.no_grad():
        logits = model(tokens=probe)
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)
    # whitened truncation keeps the compressed model near the dense one
    assert (logits - dense_logits).norm() < 0.5 * dense_logits.norm()


def test_targets_exclude_and_errors():
    model = tiny_llama()
    assert len(find_targets(model)) == 14  # 7 linears x 2 layers; lm_head excluded
    assert "lm_head" not in find_targets(model)
    mlp_only = find_targets(model, exclude=["self_attn"])
    assert len(mlp_only) == 6
    assert set(find_targets(model, targets=[r"lm_head"])) == {"lm_head"}
    with pytest.raises(RankcutError, match="q_proj"):
        find_targets(model, targets=["nothing-matches"])


def test_model_device_reads_parameters_then_buffers_then_the_default():
    from rankcut.models import model_device

    assert model_device(torch.nn.Linear(2, 2, device="meta")).type == "meta"
    buffered = torch.nn.BatchNorm1d(3, affine=False).to("meta")  # buffers, no parameters
    assert list(buffered.parameters()) == []
    assert model_device(buffered).type == "meta"
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")
    assert model_device(torch.nn.ReLU(), default="meta").type == "meta"
