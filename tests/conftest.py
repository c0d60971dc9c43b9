"""Shared fixtures: tiny models built from configs and a tiny trained tokenizer (no network)."""

from __future__ import annotations

import random

import pytest
import torch

WORDS = (
    "the a king queen lord lady speak hear love death night day sword crown heart "
    "blood sleep dream fair foul good ill come go stay fly thou thee thy my your our "
    "and but or if when then now never ever ay no yes what why how where who whom "
    "kingdom castle field storm sea star moon sun fire water earth air ghost witch"
).split()


@pytest.fixture(autouse=True)
def _no_calibration_cache_by_default(monkeypatch):
    """Tests never write calibration data into the user's cache folder: the calibration
    cache is off unless a test turns it on (with ``RANKCUT_CACHE`` in its tmp_path)."""
    monkeypatch.setenv("RANKCUT_CALIB_CACHE", "0")


def make_text(seed: int, words: int = 6000) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(words // 10):
        line = " ".join(rng.choice(WORDS) for _ in range(10))
        lines.append(line.capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([make_text(s, 2000) for s in range(3)], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int = 400, seed: int = 0, **overrides):
    """A tiny random Llama (2 layers, hidden 64); ``overrides`` change config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    cfg = LlamaConfig(**{**fields, **overrides})
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int = 400, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(vocab_size: int = 400, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=256,
    )
    return BertModel(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A Hugging Face folder (config, safetensors, tokenizer) holding a tiny Llama."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(make_text(seed=10))
    return path


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(make_text(seed=20))
    return path


@pytest.fixture
def windows():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 400, (4, 32), generator=gen)
