"""``rankcut train`` through ``rankcut.cli.main`` (micro model, a few steps, no network)."""

from __future__ import annotations

import json

import pytest

from rankcut.cli import main

from .conftest import make_text
from .test_cli import assert_user_error

TINY = [
    "--arch",
    "micro",
    "--seq-len",
    "32",
    "--batch",
    "4",
    "--vocab-size",
    "512",
    "--eval-tokens",
    "256",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-train") / "train.txt"
    path.write_text(make_text(seed=4, words=6000))
    return path


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def entries(folder) -> list[str]:
    """What is in ``folder``, temporary siblings included (nothing may be left behind)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_train_then_eval(capsys, tmp_path, text_file):
    out = tmp_path / "run"
    assert run("train", "--data", text_file, *TINY, "--steps", "4", "--out", out) == 0
    stdout = capsys.readouterr().out
    assert "dense (arch:micro): 4 steps" in stdout and f"saved to {out}" in stdout
    assert (out / "rankcut.json").is_file() and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert (
        run("eval", out, "--data", text_file, "--tokens", "256", "--seq-len", "32", "--json") == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["perplexity"] > 1


def test_resume_continues_a_stopped_run(capsys, tmp_path, text_file):
    from rankcut.train.loop import train

    out = tmp_path / "run"
    args = ["--data", text_file, *TINY, "--steps", "4", "--checkpoint-every", "2", "--out", out]
    # a run killed after its checkpoint at step 2
    train(
        data=str(text_file),
        arch="micro",
        seq_len=32,
        batch=4,
        vocab_size=512,
        eval_tokens=256,
        steps=4,
        checkpoint_every=2,
        out=str(out),
        stop_after=2,
        progress=False,
    )
    code = run("train", *args)
    assert_user_error(capsys, code, "unfinished training run", "--resume")
    assert run("train", *args, "--resume") == 0
    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["training"]["resumed_at"] == [2] and meta["training"]["steps"] == 4


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--method", "nosuch"], ["unknown training method 'nosuch'"]),
        (["--param-ratio", "1.5"], ["--param-ratio must be in (0, 1]"]),
        (["--param-ratio", "0"], ["--param-ratio must be in (0, 1]"]),
        (["--rank", "1000"], ["--rank 1000 is larger than the matrix"]),
        (["--rank", "4", "--param-ratio", "0.5"], ["--rank or --param-ratio"]),
        (["--option", "foo=1"], ["does not take option(s) foo"]),
        (["--model", "x"], ["--model", "--arch"]),
        (["--resume"], ["no checkpoint"]),
        (["--seq-len", "100000"], ["--seq-len 100000 is longer than the model"]),
        (["--schedule", "linear"], ["--schedule"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(extra, fragments, capsys, tmp_path, text_file):
    out = tmp_path / "out"
    code = run("train", "--data", text_file, *TINY, "--steps", "2", "--out", out, *extra)
    assert_user_error(capsys, code, *fragments)
    assert not out.exists()
    assert [n for n in entries(tmp_path) if n.startswith(".out")] == []


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("", "is empty"), ("  \n\n", "is empty"), ("to be or not\n" * 3, "too short")],
)
def test_empty_or_short_text(content, fragment, capsys, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text(content)
    out = tmp_path / "out"
    code = run("train", "--data", data, *TINY, "--steps", "2", "--out", out)
    assert_user_error(capsys, code, fragment)
    assert not out.exists()


def test_existing_out_needs_overwrite(capsys, tmp_path, text_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = run("train", "--data", text_file, *TINY, "--steps", "2", "--out", out)
    assert_user_error(capsys, code, "not empty", "--overwrite")
    assert entries(out) == ["keep.txt"]
    assert (
        run("train", "--data", text_file, *TINY, "--steps", "2", "--out", out, "--overwrite") == 0
    )
    assert "keep.txt" not in entries(out) and "rankcut.json" in entries(out)


def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, text_file):
    """A real kill (SIGKILL, no clean-up) at some checkpoint, then ``--resume``.

    The killed run is a subprocess on one thread; the uninterrupted and the resumed
    runs run here on one thread too (bitwise equality needs the same threads)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    args = ["--data", text_file, *TINY, "--steps", "20", "--checkpoint-every", "2"]
    # the same kernels as the in-process runs: bitwise equality needs them (the
    # executable would otherwise start again with MKL's fast path on AMD, rankcut.launch)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANKCUT_MKL_VENDOR_FIX": "0"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cmd = [sys.executable, "-m", "rankcut", "-q", "train", *map(str, args), "--out", str(cut)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    state = cut / ".checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if (cut / "rankcut.json").is_file():
        pytest.skip("the run finished before it could be killed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run("train", *args, "--out", cut, "--resume") == 0
        assert run("train", *args, "--out", whole) == 0
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((cut / "rankcut.json").read_text())
    assert meta["training"]["resumed_at"] and meta["training"]["steps"] == 20
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cut")] == []


def test_fine_tune_a_pretrained_model_with_trp(capsys, tmp_path, text_file, tiny_llama_dir):
    out = tmp_path / "trp"
    args = ["--data", text_file, "--model", tiny_llama_dir, "--method", "trp", "--steps", "3"]
    args += ["--param-ratio", "0.5", "--seq-len", "32", "--batch", "2", "--eval-tokens", "256"]
    assert run("train", *args, "--out", out) == 0
    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["source_model"] == str(tiny_llama_dir)
    assert meta["training"]["source"] == str(tiny_llama_dir)
    assert meta["training"]["config"]["lr"] == 5e-5  # the fine-tuning default
    assert meta["layers"], "TRP saves its weights factorized"
    capsys.readouterr()
    assert (
        run("eval", out, "--data", text_file, "--tokens", "256", "--seq-len", "32", "--json") == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["params_total"] < report["params_dense_equivalent"]
