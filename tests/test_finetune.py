"""Recovery fine-tuning on a tiny model: loss goes down, only factors change, round trip."""

import copy

import pytest
import torch

import rankcut
from rankcut.cli import main
from rankcut.errors import ConfigError, RankcutError
from rankcut.finetune import RecoveryConfig, recover
from rankcut.layers import factorized_modules

from .conftest import tiny_llama


def windows(n=8, seq=32):
    # A learnable pattern: every token has one fixed successor (a cycle of 8 tokens).
    cycle = torch.arange(3, 11)
    return torch.stack([cycle.roll(-i).repeat(seq // 8) for i in range(n)])


def test_recovery_lowers_training_loss_and_only_touches_factors():
    model = tiny_llama()
    rankcut.compress(model, rankcut.SvdConfig(ratio=0.5), progress=False)
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if ".up." not in n and ".down." not in n
    }
    x = windows()
    stats = recover(
        model, x, RecoveryConfig(steps=40, lr=1e-2, warmup=2, distill=0.0), progress=False
    )
    losses = stats["losses"]
    assert len(losses) == 40
    # The frozen tiny tied head (std 0.02) caps how confident logits get: ask for 10%.
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not model.training


def kl_to(teacher, student, x):
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=x).logits, -1)
        s = torch.log_softmax(student(input_ids=x).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_distillation_moves_student_towards_teacher():
    teacher = tiny_llama()
    model = copy.deepcopy(teacher)
    rankcut.compress(model, rankcut.SvdConfig(ratio=0.6), progress=False)
    x = windows()
    before = kl_to(teacher, model, x)
    recover(
        model,
        x,
        RecoveryConfig(steps=30, lr=3e-3, warmup=2, distill=1.0),
        teacher=teacher,
        progress=False,
    )
    assert kl_to(teacher, model, x) < 0.7 * before


def test_recovery_without_teacher_and_round_trip(tmp_path):
    model = tiny_llama()
    rankcut.compress(model, rankcut.SvdConfig(ratio=0.5), progress=False)
    before = [m.up.weight.detach().clone() for _, m in factorized_modules(model)]
    recover(model, windows(), RecoveryConfig(steps=5, lr=1e-3, distill=0.0), progress=False)
    after = [m.up.weight for _, m in factorized_modules(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    rankcut.save(model, tmp_path / "out")
    loaded = rankcut.load(tmp_path / "out")
    x = windows()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_recovery_errors():
    with pytest.raises(ConfigError):
        RecoveryConfig(steps=0)
    with pytest.raises(RankcutError, match="no factorized"):
        recover(tiny_llama(), windows(), RecoveryConfig(steps=1), progress=False)


def test_cli_compress_recover_and_finetune(
    tmp_path, tiny_llama_dir, calib_file, eval_file, capsys, monkeypatch
):
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(
        [
            "-q",
            "compress",
            "--model",
            str(tiny_llama_dir),
            "--method",
            "svd-llm",
            "--ratio",
            "0.4",
            "--calib",
            str(calib_file),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--out",
            str(out),
            "--recover",
            "6",
            "--recover-lr",
            "1e-3",
            "--allocation",
            "global",
            "--pipeline",
            "sequential",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "recovery: 6 steps" in text
    meta = rankcut.io.read_meta(out)
    assert meta["recovery"]["config"]["steps"] == 6
    # default recovery data ("auto", recorded resolved): 6 fresh windows sampled from the tiny Llama
    assert meta["recovery"]["windows"] == 6 and meta["recovery"]["data"] == "generated"
    assert meta["method_config"]["allocation"] == "global"
    assert meta["method_config"]["pipeline"] == "sequential"
    code = main(
        [
            "-q",
            "finetune",
            str(out),
            "--steps",
            "4",
            "--lr",
            "1e-3",
            "--data",
            str(calib_file),
            "--seq-len",
            "32",
            "--eval-data",
            str(eval_file),
            "--eval-tokens",
            "128",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out perplexity" in text
    meta = rankcut.io.read_meta(out)
    assert meta["recovery"]["config"]["steps"] == 4
    assert meta["recovery"]["perplexity_after"] > 1
    assert meta["recovery"]["data"] == str(calib_file)
    code = main(
        ["-q", "finetune", str(out), "--steps", "3", "--seq-len", "16", "--windows", "2"]
        + ["--data", "generated", "--eval-data", ""]
    )
    assert code == 0
    assert "recovery data: 2 windows sampled" in capsys.readouterr().out
    meta = rankcut.io.read_meta(out)
    assert (meta["recovery"]["windows"], meta["recovery"]["data"]) == (2, "generated")
    assert rankcut.load(out) is not None
    code = main(["-q", "finetune", str(tiny_llama_dir), "--steps", "1"])
    assert code == 2 and "rankcut output" in capsys.readouterr().err


def test_lora_recovery_merges_into_the_factors(tmp_path):
    pytest.importorskip("peft")
    model = tiny_llama()
    rankcut.compress(model, rankcut.SvdConfig(ratio=0.5), progress=False)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    x = windows()
    stats = recover(
        model,
        x,
        RecoveryConfig(steps=40, lr=1e-2, warmup=2, distill=0.0, lora_rank=4),
        progress=False,
    )
    losses = stats["losses"]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    # Adapters are merged and gone: same parameter names and shapes, plain layers.
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert not any("lora" in n for n, _ in model.named_modules())
    rankcut.save(model, tmp_path / "out")
    loaded = rankcut.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
        trained = float(
            torch.nn.functional.cross_entropy(
                model(input_ids=x).logits[:, :-1].reshape(-1, 400), x[:, 1:].reshape(-1)
            )
        )
    assert trained < losses[0]


def test_bad_lora_rank():
    with pytest.raises(ConfigError, match="lora_rank"):
        RecoveryConfig(lora_rank=-1)


def test_cli_recovery_with_lora(tmp_path, tiny_llama_dir, calib_file):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    args = ["compress", "--model", tiny_llama_dir, "--method", "svd", "--ratio", "0.4"]
    args += ["--calib", calib_file, "--samples", "4", "--seq-len", "32", "--out", out]
    assert main(["-q", *map(str, args), "--recover", "3", "--recover-lora", "2"]) == 0
    meta = rankcut.io.read_meta(out)
    assert meta["recovery"]["config"]["lora_rank"] == 2
    assert not any("lora" in k for k in meta["layers"])
