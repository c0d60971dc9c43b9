"""Save -> load round trips: logits equal, structure rebuilt, no pickle."""

import json

import pytest
import torch

import rankcut
from rankcut.errors import RankcutError
from rankcut.layers import LowRankLinear, factorized_modules
from rankcut.methods import SvdConfig, SvdLlmConfig

from .conftest import TINY_MODELS


def outputs(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("compressed", [True, False])
def test_save_load_logits_equal(arch, compressed, tmp_path, windows):
    model = TINY_MODELS[arch]()
    if compressed:
        rankcut.compress(model, SvdLlmConfig(ratio=0.4), windows, progress=False)
    ref = outputs(model, windows)
    rankcut.save(model, tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"rankcut.json", "model.safetensors", "config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    loaded = rankcut.load(tmp_path / "out")
    assert type(loaded) is type(model)
    torch.testing.assert_close(outputs(loaded, windows), ref, rtol=0, atol=0)
    before = {n: m.rank for n, m in factorized_modules(model)}
    assert {n: m.rank for n, m in factorized_modules(loaded)} == before
    assert bool(before) == compressed
    for _, layer in factorized_modules(loaded):  # the decode layout survives loading
        up = layer.up.weight
        assert up.shape[0] <= up.shape[1] or up.stride() == (1, up.shape[0])
    meta = json.loads((tmp_path / "out" / "rankcut.json").read_text())
    assert {n: s["rank"] for n, s in meta["layers"].items()} == before
    if compressed:
        assert meta["method_config"]["method"] == "svd-llm"


def test_tied_embeddings_stay_tied(tmp_path):
    model = TINY_MODELS["llama"]()
    rankcut.compress(model, SvdConfig(ratio=0.5), progress=False)
    rankcut.save(model, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "rankcut.json").read_text())
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = rankcut.load(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_load_hf_dir_and_tokenizer(tiny_llama_dir):
    model = rankcut.load(tiny_llama_dir)
    tok = rankcut.load_tokenizer(tiny_llama_dir)
    assert model.config.vocab_size == len(tok)


def test_overwrite_rules(tmp_path):
    model = TINY_MODELS["gpt2"]()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(RankcutError, match="not empty"):
        rankcut.save(model, out)
    assert (out / "keep.txt").exists()
    rankcut.save(model, out, overwrite=True)
    assert (out / "rankcut.json").exists() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary leftovers


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        rankcut.save(TINY_MODELS["gpt2"](), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: "{not json", "cannot read"),
        (lambda m: json.dumps({**m, "format": "other"}), "not a rankcut"),
        (lambda m: json.dumps({**m, "format_version": 99}), "format_version"),
        (
            lambda m: json.dumps({**m, "layers": {"model.layers.0.mlp.up_proj": {"type": "X"}}}),
            "invalid layer",
        ),
        (
            lambda m: json.dumps({**m, "layers": {"nope.q": {**next(iter(m["layers"].values()))}}}),
            "absent",
        ),
        (
            lambda m: json.dumps(
                {**m, "layers": {k: {**v, "rank": v["rank"] + 1} for k, v in m["layers"].items()}}
            ),
            "do not match",
        ),
        (lambda m: json.dumps({**m, "architecture": "NoSuchModel"}), "no model class"),
    ],
)
def test_corrupted_metadata_gives_clear_error(tmp_path, edit, message):
    model = TINY_MODELS["llama"]()
    rankcut.compress(model, SvdConfig(ratio=0.5), progress=False)
    rankcut.save(model, tmp_path / "out")
    path = tmp_path / "out" / "rankcut.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(RankcutError, match=message):
        rankcut.load(tmp_path / "out")


def test_missing_path_and_unknown_alias():
    with pytest.raises(RankcutError, match="does not exist"):
        rankcut.load("./no/such/dir")
    with pytest.raises(RankcutError, match="unknown model"):
        rankcut.load("no-such-alias")


def test_lowrank_layers_are_real_modules_after_load(tmp_path):
    model = TINY_MODELS["gpt2"]()
    rankcut.compress(model, SvdConfig(ratio=0.5), progress=False)
    rankcut.save(model, tmp_path / "out")
    loaded = rankcut.load(tmp_path / "out")
    layer = loaded.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, LowRankLinear)
    assert (layer.in_features, layer.out_features) == (64, 192)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
