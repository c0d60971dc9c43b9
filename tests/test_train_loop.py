"""The training loop (``rankcut.train.loop``): data, tokenizer, loss, resume, save (tiny, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import rankcut
from rankcut.data import bos_prefix
from rankcut.errors import ConfigError, RankcutError
from rankcut.train.loop import (
    CHECKPOINT_DIR,
    HELDOUT_SPLITS,
    TrainConfig,
    batch_indices,
    load_texts,
    lr_factor,
    make_data,
    pack,
    split_heldout,
    train,
    unpack,
)
from rankcut.train.methods import TRAIN_METHODS
from rankcut.train.scratch import build_model, train_tokenizer

from .conftest import make_text

#: What every test run shares: the ``micro`` architecture, short windows, few steps.
TINY = dict(arch="micro", seq_len=32, batch=4, vocab_size=512, eval_tokens=512, lr=3e-3)

#: Methods of issue 17 (galore needs galore-torch, which `make venv` installs).
METHODS = ["dense", "lrt", "sltrain", "maestro", "trp", "galore"]


def test_every_method_is_registered():
    assert set(METHODS) <= set(TRAIN_METHODS)


def test_python_api_names():
    import rankcut.train.loop as loop

    assert rankcut.train_model is loop.train and rankcut.TrainConfig is loop.TrainConfig
    assert rankcut.train.__name__ == "rankcut.train"  # the subpackage, whatever was imported


def budget(method: str) -> dict:
    return {} if method == "dense" else {"param_ratio": 0.5}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "train.txt"
    path.write_text(make_text(seed=1, words=8000))
    return path


@pytest.fixture(scope="module")
def eval_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "val.txt"
    path.write_text(make_text(seed=2, words=2000))
    return path


def test_tokenizer_round_trips_and_is_deterministic():
    text = make_text(seed=3, words=3000)
    first, second = train_tokenizer(text, 400), train_tokenizer(text, 400)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) <= 400
    for sample in ("The king speaks.\n", "héllo — 世界\n\ttabs  and  spaces ", "<|endoftext|>"):
        ids = first(sample, add_special_tokens=False)["input_ids"]
        assert first.decode(ids) == sample
    # no BOS: the perplexity protocol scores every token
    assert bos_prefix(first) == []


def test_tokenizer_refuses_empty_text_and_tiny_vocab():
    with pytest.raises(RankcutError, match="empty"):
        train_tokenizer("  \n", 400)
    with pytest.raises(ConfigError, match="257"):
        train_tokenizer("abc", 100)


def test_build_model_is_deterministic_and_sized_to_the_tokenizer():
    tok = train_tokenizer(make_text(seed=3, words=1000), 300)
    a, b = build_model("micro", tok, seed=5), build_model("micro", tok, seed=5)
    assert a.config.vocab_size == len(tok)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    tiny = build_model("tiny", tok, seed=0)  # the blocks' size does not depend on the vocabulary
    blocks = sum(p.numel() for p in tiny.model.layers.parameters())
    assert 2_000_000 < blocks < 20_000_000


def test_arch_json_and_bad_arch(tmp_path):
    tok = train_tokenizer(make_text(seed=3, words=1000), 300)
    path = tmp_path / "arch.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    assert build_model(str(path), tok).config.hidden_size == 32
    with pytest.raises(ConfigError, match="unknown --arch"):
        build_model("huge", tok)
    path.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(RankcutError, match="model_type"):
        build_model(str(path), tok)


def test_validation_is_held_out_from_the_end_and_never_trained_on(text_file):
    config = TrainConfig(data=str(text_file), **TINY)
    train_text, eval_text, source = load_texts(config)
    whole = text_file.read_text().strip()
    assert train_text + eval_text == whole and "last 10%" in source
    assert len(eval_text) < 0.11 * len(whole)
    tok = train_tokenizer(train_text, 512)
    data = make_data(config, tok, train_text, eval_text, source)
    train_rows = {tuple(row) for row in data.train.tolist()}
    assert not any(tuple(row) in train_rows for row in data.eval.tolist())
    for row in data.eval[:4]:
        assert tok.decode(row.tolist()) in eval_text
    # every training window lies in the training part
    joined = tok.decode(data.train.flatten().tolist())
    assert joined in train_text


def test_builtin_corpus_validates_on_its_held_out_split_and_eval_data_must_differ(text_file):
    assert HELDOUT_SPLITS["shakespeare"] == "shakespeare-heldout"
    with pytest.raises(ConfigError, match="held out"):
        load_texts(TrainConfig(data=str(text_file), eval_data=str(text_file)))


def test_split_heldout_cuts_at_a_line_end():
    head, tail = split_heldout("one\ntwo\nthree\nfour\n", 0.25)
    assert head + tail == "one\ntwo\nthree\nfour\n" and tail == "four\n"


def test_batches_visit_every_window_once_per_epoch():
    n, batch = 10, 4
    seen = [i for step in range(5) for i in batch_indices(step, batch, n, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new order each epoch
    assert batch_indices(2, batch, n, seed=3) == batch_indices(2, batch, n, seed=3)


def test_lr_schedule_warms_up_and_decays():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "constant") == 1.0


def test_pack_round_trips_nested_state():
    state = {
        0: {"step": torch.tensor(3.0), "m": torch.arange(4.0)[1:]},
        "g": [(0.9, 0.99), math.inf],
    }
    tensors: dict = {}
    packed = json.loads(json.dumps(pack(state, tensors)))
    back = unpack(packed, tensors)
    assert back[0]["m"].tolist() == [1.0, 2.0, 3.0] and back["g"] == [(0.9, 0.99), math.inf]
    with pytest.raises(RankcutError, match="cannot checkpoint"):
        pack({"x": object()}, {})


def test_config_checks():
    for bad in (
        {"param_ratio": 0.0},
        {"param_ratio": 1.5},
        {"rank": 0},
        {"steps": 0},
        {"rank": 4, "param_ratio": 0.5},
        {"model": "x", "arch": "tiny"},
        {"resume": True},
        {"seq_len": 1},
        {"lr": -1.0},
        {"schedule": "linear"},
    ):
        with pytest.raises(ConfigError):
            TrainConfig(data="shakespeare", **bad)
    assert TrainConfig(data="x", model="m").lr == 5e-5
    assert TrainConfig(data="x").lr == 1e-3
    assert TrainConfig(data="x", method="sltrain").lr == 3e-3  # the authors' from scratch
    assert TrainConfig(data="x", method="sltrain", model="m").lr == 5e-5


def test_dense_training_lowers_the_loss(text_file):
    result = train(
        data=str(text_file), method="dense", steps=30, eval_every=10, progress=False, **TINY
    )
    s = result.summary
    ppl = [v["perplexity"] for v in s["validation"]]
    assert [v["step"] for v in s["validation"]] == [0, 10, 20, 30]
    assert ppl[-1] < 0.7 * ppl[0]
    assert sum(s["loss"][-5:]) < sum(s["loss"][:5])
    assert s["tokens"] == 30 * 4 * 32
    assert s["params"]["trained_ratio"] == 1.0
    assert s["optimizer_state_bytes"] > 0 and s["peak_memory_bytes"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(method, text_file, tmp_path):
    common = dict(
        data=str(text_file),
        method=method,
        steps=6,
        checkpoint_every=2,
        eval_every=2,
        progress=False,
        **TINY,
        **budget(method),
    )
    whole = train(out=str(tmp_path / "whole"), **common)
    stopped = train(out=str(tmp_path / "cut"), stop_after=3, **common)
    assert stopped.stopped and (tmp_path / "cut" / CHECKPOINT_DIR / "state.json").is_file()
    assert not (tmp_path / "cut" / "rankcut.json").exists()
    resumed = train(out=str(tmp_path / "cut"), resume=True, **common)
    assert resumed.summary["resumed_at"] == [3]
    assert resumed.summary["loss"] == whole.summary["loss"]
    assert resumed.summary["validation"] == whole.summary["validation"]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not (tmp_path / "cut" / CHECKPOINT_DIR).exists()  # the final save replaced it


def test_resume_refuses_another_run_and_a_missing_checkpoint(text_file, tmp_path):
    common = dict(data=str(text_file), steps=4, checkpoint_every=2, progress=False, **TINY)
    train(out=str(tmp_path / "run"), stop_after=2, **common)
    with pytest.raises(ConfigError, match="another run"):
        train(out=str(tmp_path / "run"), resume=True, **{**common, "lr": 1e-2})
    with pytest.raises(RankcutError, match="unfinished training run"):
        train(out=str(tmp_path / "run"), **common)
    with pytest.raises(RankcutError, match="no checkpoint"):
        train(out=str(tmp_path / "none"), resume=True, **common)
    assert not (tmp_path / "none").exists()


def test_saved_model_round_trips_logits_and_tokenizer(text_file, tmp_path):
    out = tmp_path / "model"
    result = train(data=str(text_file), steps=3, out=str(out), progress=False, **TINY)
    model, tok = rankcut.load(out), rankcut.load_tokenizer(out)
    sample = "The king and the queen.\n"
    ids = tok(sample, return_tensors="pt")["input_ids"]
    assert ids.tolist() == result.tokenizer(sample, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, result.model(input_ids=ids).logits)
    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["training"]["method"] == "dense" and meta["training"]["steps"] == 3
    assert meta["params"]["targeted_before"] == meta["training"]["params"]["dense_targets"]
    assert json.loads((out / "train.json").read_text())["steps"] == 3


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_each_method_trains_and_reports_its_budget(method, text_file):
    result = train(
        data=str(text_file), method=method, steps=3, progress=False, **TINY, **budget(method)
    )
    s = result.summary
    assert math.isfinite(s["perplexity"]) and len(s["loss"]) == 3
    if method in ("lrt", "sltrain", "maestro"):
        assert s["params"]["final_ratio"] <= 0.5 + 0.05  # maestro trains at full rank, then cuts


def test_galore_keeps_less_optimizer_state_than_dense(text_file):
    common = dict(data=str(text_file), steps=2, progress=False, **TINY)
    dense = train(method="dense", **common).summary
    galore = train(method="galore", rank=4, **common).summary
    assert galore["optimizer_state_bytes"] < dense["optimizer_state_bytes"]
    assert galore["finalize"]["projection_rank"] == 4
