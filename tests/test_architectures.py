"""The default recipe on tiny random models of many transformers architectures.

rankcut is used on models it was not written against: each architecture here is built
from its config at a few thousand parameters, and the default ``compress`` (svd-llm,
global allocation, sequential pipeline with refit) must run, save and load back, and
give the same factors whichever of its equivalent paths it takes (the shortcuts of the
sequential pipeline, the dense stage inputs kept from the statistics pass or recomputed).
Each of these paths once went wrong on one architecture: Falcon adds its attention to
the MLP's output in place, Gemma 2 and 3 and ModernBERT give their local and global
layers different masks (and Gemma 3 different rotary tables), DeBERTa's encoder unpacks
a pair from each layer, ALBERT runs one layer module as every layer; the streaming
pipeline looked for GPT-NeoX's head under the model's name (``lm_head``) instead of the
checkpoint's (``embed_out``), and handed DeBERTa's encoder a tensor for its pair.
"""

import copy

import pytest
import torch
import transformers

import rankcut
from rankcut.calibrate import activations
from rankcut.calibrate.sequential import capture_block_calls, run_block
from rankcut.methods import SvdLlmConfig
from rankcut.models import find_decoder_layers
from rankcut.pipelines import sequential

H, FFN, V, LAYERS = 64, 128, 300, 4
DECODER = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    max_position_embeddings=128,
)
SLIDING = ["sliding_attention", "full_attention"] * (LAYERS // 2)
# config class name -> its arguments (a sliding window shorter than the windows, so the
# masks of sliding and full layers really differ)
CONFIGS = {
    "Llama": dict(DECODER, num_key_value_heads=2, tie_word_embeddings=False),
    "Qwen2": dict(DECODER, num_key_value_heads=2),
    "Qwen3": dict(DECODER, num_key_value_heads=2, head_dim=16),
    "Mistral": dict(DECODER, num_key_value_heads=2, sliding_window=8),
    "Gemma": dict(DECODER, num_key_value_heads=1, head_dim=16),
    "Gemma2": dict(DECODER, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "Gemma3Text": dict(
        DECODER, num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=SLIDING
    ),
    "Phi3": dict(DECODER, num_key_value_heads=2, pad_token_id=0),
    "Phi": dict(DECODER),
    "GPTNeoX": dict(DECODER),
    "StableLm": dict(DECODER, num_key_value_heads=2),
    "Olmo2": dict(DECODER),
    "Starcoder2": dict(DECODER, num_key_value_heads=2),
    "Cohere": dict(DECODER, num_key_value_heads=2),
    "Falcon": dict(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
    ),
    "OPT": dict(
        vocab_size=V,
        hidden_size=H,
        ffn_dim=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=H,
        max_position_embeddings=128,
    ),
    "GPT2": dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=4, n_positions=128),
    "Bloom": dict(vocab_size=V, hidden_size=H, n_layer=LAYERS, n_head=4),
    "GPTJ": dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=4, n_positions=128, rotary_dim=8),
}


ENCODER = dict(DECODER, vocab_size=V)
# encoders (``AutoModel``): compared on their last hidden states
ENCODERS = {
    "Bert": ENCODER,
    "Roberta": dict(ENCODER, pad_token_id=1),
    "Electra": dict(ENCODER, embedding_size=H),
    "DebertaV2": ENCODER,  # (its layers return a pair, which the encoder unpacks)
    "ModernBert": dict(
        ENCODER,
        global_attn_every_n_layers=2,  # local and global layers: their own masks
        local_attention=8,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        cls_token_id=2,
        sep_token_id=1,
    ),
    "MPNet": ENCODER,
    "DistilBert": dict(vocab_size=V, dim=H, n_layers=LAYERS, n_heads=4, hidden_dim=FFN),
    "Albert": dict(ENCODER, embedding_size=32),  # one layer module run as every layer
}
ALL = sorted(CONFIGS) + sorted(ENCODERS)


def build(name: str) -> torch.nn.Module:
    config_class = getattr(transformers, name + "Config", None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}Config")
    torch.manual_seed(0)
    if name in ENCODERS:
        return transformers.AutoModel.from_config(config_class(**ENCODERS[name])).eval()
    config = config_class(**CONFIGS[name])
    if name == "Gemma3Text":
        return transformers.Gemma3ForCausalLM(config).eval()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def windows(n=8, seq=32, seed=0):
    return torch.randint(0, V, (n, seq), generator=torch.Generator().manual_seed(seed))


def compressed_logits(model, calib, test):
    rankcut.compress(model, SvdLlmConfig(ratio=0.3), calib, progress=False)
    return outputs(model, test)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ALL)
def test_default_compress_runs_and_round_trips(name, tmp_path):
    model = build(name)
    calib, test = windows(), windows(2, seed=1)
    dense = outputs(model, test)
    result = rankcut.compress(model, SvdLlmConfig(ratio=0.3), calib, progress=False)
    # (ALBERT runs one layer module as all its layers: block by block cannot apply)
    assert result.config.pipeline == ("whole" if name == "Albert" else "sequential")
    assert result.ranks, "nothing factorized"
    removed = 1 - result.params["targeted_after"] / result.params["targeted_before"]
    assert removed == pytest.approx(0.3, abs=0.02)
    out = outputs(model, test)
    assert torch.isfinite(out).all()
    assert rel(out, dense) < 1.0  # a random model at 30% fewer parameters: not destroyed
    rankcut.save(model, tmp_path / "out")
    back = rankcut.load(tmp_path / "out")
    torch.testing.assert_close(outputs(back, test), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in ALL if n != "Albert"])
def test_block_calls_replay_the_model(name):
    """Each block run on the captured inputs of the block before it, with the arguments
    the model gives that block, reproduces the model's own hidden states."""
    model = build(name)
    ids = windows(4)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    blocks = [b for _, b in find_decoder_layers(model)]
    inputs, calls = capture_block_calls(model, blocks, ids, batch_size=2)
    for k, block in enumerate(blocks):
        inputs = calls.retarget(inputs, k)
        hidden = torch.cat([b.hidden for b in inputs])
        torch.testing.assert_close(hidden, states[k], rtol=1e-5, atol=1e-5)
        inputs = [b.with_hidden(run_block(block, b)) for b in inputs]


def test_block_calls_tell_layer_kinds_apart():
    """Gemma 3's sliding and full-attention layers get their own arguments; Llama's
    blocks all take the first block's."""
    gemma = build("Gemma3Text")
    blocks = [b for _, b in find_decoder_layers(gemma)]
    _, calls = capture_block_calls(gemma, blocks, windows(4), batch_size=2)
    assert sorted(calls.other) == [k for k, kind in enumerate(SLIDING) if kind != SLIDING[0]]
    llama = build("Llama")
    blocks = [b for _, b in find_decoder_layers(llama)]
    inputs, calls = capture_block_calls(llama, blocks, windows(4), batch_size=2)
    assert calls.uniform and calls.retarget(inputs, 2) is inputs


@pytest.mark.parametrize("name", ALL)
def test_sequential_shortcuts_give_the_plain_result(name, monkeypatch):
    """The replayed children (``_Replay``) and the additive last stage (``_Tail``) save
    block runs without changing the factors."""
    model = build(name)
    calib, test = windows(), windows(2, seed=1)
    fast = compressed_logits(copy.deepcopy(model), calib, test)
    monkeypatch.setattr(sequential, "REPLAY", False)
    monkeypatch.setattr(sequential._Tail, "TOLERANCE", -1.0)  # never additive
    plain = compressed_logits(model, calib, test)
    assert rel(fast, plain) < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_kept_dense_inputs_equal_rerun_dense_blocks(name, monkeypatch):
    """The dense stage inputs kept from the statistics pass are what rerunning the dense
    blocks gives (``MEMORY_FRACTION = 0``: nothing kept)."""
    model = build(name)
    calib, test = windows(), windows(2, seed=1)
    kept = compressed_logits(copy.deepcopy(model), calib, test)
    monkeypatch.setattr(activations, "MEMORY_FRACTION", 0.0)
    rerun = compressed_logits(model, calib, test)
    assert rel(kept, rerun) < 1e-5


@pytest.mark.parametrize("name", [n for n in ALL if n != "Albert"])
def test_streaming_equals_in_memory_sequential(name, tmp_path):
    """Streaming (one block loaded at a time, activations in files) gives each block the
    arguments the model gives it, as the in-memory sequential pipeline does."""
    from rankcut.streaming import stream_compress

    build(name).save_pretrained(tmp_path / "ckpt")
    calib, test = windows(), windows(2, seed=1)
    config = SvdLlmConfig(ratio=0.3, pipeline="sequential", allocation="uniform")
    ref = rankcut.load(tmp_path / "ckpt")
    result = rankcut.compress(ref, config, calib, progress=False)
    meta = stream_compress(tmp_path / "ckpt", config, calib, tmp_path / "out", progress=False)
    assert meta["ranks"] == result.ranks
    got = rankcut.load(tmp_path / "out")
    torch.testing.assert_close(outputs(got, test), outputs(ref, test), rtol=1e-5, atol=1e-5)


def test_sequential_refuses_shared_layers_in_one_line():
    from rankcut.errors import RankcutError

    model = build("Albert")
    config = SvdLlmConfig(ratio=0.3, pipeline="sequential")
    with pytest.raises(RankcutError, match="one module per layer.*--pipeline whole"):
        rankcut.compress(model, config, windows(), progress=False)


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_products_run_on_every_architecture(name, monkeypatch):
    """``compute_dtype="bfloat16"`` with every product in bfloat16 (the size thresholds
    that keep tiny models exact lowered to 1): the default compress runs, products were
    really computed in bfloat16, and the factors differ from the float32 ones by much
    less than the compression itself changes the model (a quarter of it at most)."""
    from rankcut.calibrate import precision

    defaults = precision.LowPrecisionLinears.__init__.__kwdefaults__
    monkeypatch.setitem(defaults, "min_rows", 1)
    monkeypatch.setitem(defaults, "min_weight", 1)
    calls = []
    enter = precision.LowPrecisionLinears.__exit__

    def count(self, *exc):
        calls.append(self.calls)
        return enter(self, *exc)

    monkeypatch.setattr(precision.LowPrecisionLinears, "__exit__", count)
    base = build(name)
    calib, test = windows(), windows(2, seed=1)
    dense = outputs(base, test)
    exact, low = copy.deepcopy(base), copy.deepcopy(base)
    rankcut.compress(exact, SvdLlmConfig(ratio=0.3, compute_dtype="float32"), calib, progress=False)
    assert not calls
    result = rankcut.compress(
        low, SvdLlmConfig(ratio=0.3, compute_dtype="bfloat16"), calib, progress=False
    )
    assert result.config.compute_dtype == "bfloat16"
    assert calls and sum(calls) > 0, "no product went through bfloat16"
    out_exact, out_low = outputs(exact, test), outputs(low, test)
    assert torch.isfinite(out_low).all()
    assert rel(out_low, out_exact) < 0.25 * rel(out_exact, dense)  # (measured: <= 0.09)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_train_method_trains_saves_and_loads(name, tmp_path):
    """Each ``rankcut train`` method on each decoder architecture (GPT-2's Conv1D,
    Falcon's fused attention...): a few steps with finite losses, the method's final
    layers (factorized where it factorizes), and a save/load that gives the same logits."""
    from rankcut.layers import factorized_modules
    from rankcut.train.methods import TRAIN_METHODS

    from .test_train_methods import Run, setup_for

    base = build(name)
    data = list(windows(6, 16).split(2))
    budgets = {"dense": {}, "maestro": {}, "galore": {"rank": 8}}
    for method in TRAIN_METHODS:
        model = copy.deepcopy(base)
        setup = setup_for(model, steps=3, **budgets.get(method, {"param_ratio": 0.5}))
        run = Run(method, model, setup).steps(0, 3, data)
        assert all(map(torch.isfinite, map(torch.tensor, run.losses))), method
        run.method.finalize(model, setup)
        model.eval()
        out = outputs(model, data[0])
        assert torch.isfinite(out).all(), method
        factorized = dict(factorized_modules(model))
        assert bool(factorized) == (method not in ("dense", "galore")), method
        rankcut.save(model, tmp_path / method)
        back = rankcut.load(tmp_path / method)
        torch.testing.assert_close(outputs(back, data[0]), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_merged_export_loads_with_transformers(name, tmp_path):
    """``export --merge`` writes what the model class expects (GPT-2's ``Conv1D`` keeps
    its ``(in, out)`` layout): ``from_pretrained`` loads it and gives the compressed
    model's outputs."""
    from rankcut.io import export_merged

    model = build(name)
    calib, test = windows(), windows(2, seed=1)
    rankcut.compress(model, SvdLlmConfig(ratio=0.3), calib, progress=False)
    rankcut.save(model, tmp_path / "out")
    export_merged(tmp_path / "out", tmp_path / "merged")
    auto = transformers.AutoModel if name in ENCODERS else transformers.AutoModelForCausalLM
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, rankcut.layers.FactorizedLinear) for m in merged.modules())
    assert rel(outputs(merged, test), outputs(model, test)) < 1e-5
