"""Issue 15: nonsense is refused early, in one line, exit 2, with nothing written.

Each case runs the CLI in-process on tiny models (as ``test_cli.py`` does) and checks
the exit status, that stderr holds exactly one ``rankcut: error:`` line saying what is
wrong, and that no output folder or temporary sibling was left behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rankcut.errors import RankcutError
from rankcut.rank import AllocationInput, allocate

# _isolated: the autouse fixture that moves cache and cwd into tmp_path, as there.
from .test_cli import _isolated, assert_user_error, compress_args, compress_shared, run  # noqa: F401


@pytest.fixture(scope="module")
def gpt2_128_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-2 with learned positions, only 128 of them (``n_positions``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=len(tiny_tokenizer), n_positions=128
    )
    path = tmp_path_factory.mktemp("gpt2-128")
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_128_out(tmp_path_factory, gpt2_128_dir):
    """That GPT-2 compressed (svd, uniform, no calibration): a rankcut folder."""
    return compress_shared(tmp_path_factory, gpt2_128_dir, "gpt2-128-out")


@pytest.fixture(scope="module")
def binary_file(tmp_path_factory) -> Path:
    """Bytes that are not UTF-8 (a stand-in for a checkpoint passed as text)."""
    path = tmp_path_factory.mktemp("bin") / "weights.txt"
    path.write_bytes(bytes(range(256)) * 64)
    return path


@pytest.fixture(scope="module")
def control_file(tmp_path_factory) -> Path:
    """Valid UTF-8 that is mostly control characters: decodable, yet not text."""
    path = tmp_path_factory.mktemp("ctl") / "noise.txt"
    path.write_text("\x00\x01\x02\x03 word " * 500)
    return path


def assert_nothing_written(out: Path) -> None:
    """No output folder and no temporary or probe sibling beside it."""
    assert not out.exists(), sorted(out.iterdir()) if out.is_dir() else out
    if out.parent.is_dir():
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not left, left


# --------------------------------------------------------------------------- 1. --out


@pytest.mark.parametrize("where", ["proc", "under-file"])
def test_compress_unwritable_out(where, capsys, tmp_path, tiny_llama_dir):
    if where == "proc":
        out, fragment = Path("/proc/rankcut-x"), "cannot write output folder"
    else:
        (tmp_path / "file").write_text("x")
        out, fragment = tmp_path / "file" / "sub" / "out", "is a file"
    code = run(*compress_args(tiny_llama_dir, out))
    assert_user_error(capsys, code, fragment, str(out))
    assert (tmp_path / "file").is_file() if where != "proc" else not out.exists()


def test_compress_unwritable_out_fails_before_loading(monkeypatch, capsys, tiny_llama_dir):
    """The check comes before the model is loaded (hours saved on a large model)."""
    from rankcut import io

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(io, "load", no_load)
    code = run(*compress_args(tiny_llama_dir, "/proc/rankcut-x"))
    assert_user_error(capsys, code, "cannot write output folder")


def test_inspect_unwritable_out(capsys, tmp_path, tiny_llama_dir):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "inspect"
    code = run("inspect", tiny_llama_dir, "--out", out)
    assert_user_error(capsys, code, "is a file")
    code = run("inspect", tiny_llama_dir, "--out", "/proc/rankcut-x")
    assert_user_error(capsys, code, "cannot write output folder /proc/rankcut-x")


def test_inspect_non_empty_out_needs_overwrite(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "inspect"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    code = run("inspect", tiny_llama_dir, "--out", out)
    assert_user_error(capsys, code, "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert run("inspect", tiny_llama_dir, "--out", out, "--overwrite") == 0
    assert (out / "notes.txt").is_file() and len(list(out.iterdir())) > 1


# --------------------------------------------------------------------------- 2. --seq-len


@pytest.mark.parametrize("seq_len", ["256", "512"])  # 512 = the default, given explicitly
def test_compress_seq_len_beyond_positions(capsys, tmp_path, gpt2_128_dir, calib_file, seq_len):
    out = tmp_path / "out"
    args = compress_args(gpt2_128_dir, out, "svd-llm", calib_file, extra=["--seq-len", seq_len])
    code = run(*args)
    assert_user_error(capsys, code, f"--seq-len {seq_len}", "128 positions")
    assert_nothing_written(out)


def test_compress_default_seq_len_fits_the_model(tmp_path, gpt2_128_dir, calib_file):
    """The default calibration length (512) is shortened to the model's 128 positions."""
    out = tmp_path / "out"
    extra = ["--calib", calib_file, "--samples", "2"]
    assert run(*compress_args(gpt2_128_dir, out, "svd-llm", extra=extra)) == 0
    assert json.loads((out / "recipe.json").read_text())["seq_len"] == 128


def test_eval_seq_len_beyond_positions(capsys, gpt2_128_dir, eval_file):
    code = run("eval", gpt2_128_dir, "--data", eval_file, "--tokens", "256", "--seq-len", "256")
    assert_user_error(capsys, code, "--seq-len 256", "128 positions")


def test_eval_default_seq_len_fits_the_model(capsys, gpt2_128_dir, eval_file):
    """The default (512) is shortened to the model's 128 positions, not an IndexError."""
    assert run("eval", gpt2_128_dir, "--data", eval_file, "--tokens", "256", "--json") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["seq_len"] == 128


def test_inspect_seq_len_beyond_positions(capsys, tmp_path, gpt2_128_dir, calib_file):
    out = tmp_path / "inspect"
    code = run("inspect", gpt2_128_dir, "--calib", calib_file, "--seq-len", "256", "--out", out)
    assert_user_error(capsys, code, "--seq-len 256", "128 positions")
    assert_nothing_written(out)


def test_finetune_seq_len_beyond_positions(capsys, tmp_path, gpt2_128_out, calib_file):
    out = tmp_path / "ft"
    code = run(
        "finetune", gpt2_128_out, "--out", out, "--data", calib_file,
        "--train-seq-len", "256", "--eval-data", "", "--steps", "2",
    )  # fmt: skip
    assert_user_error(capsys, code, "--train-seq-len 256", "128 positions")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- 3. binary text


@pytest.mark.parametrize("kind", ["undecodable", "control"])
def test_binary_calib(kind, capsys, tmp_path, tiny_llama_dir, binary_file, control_file):
    path = binary_file if kind == "undecodable" else control_file
    out = tmp_path / "out"
    code = run(*compress_args(tiny_llama_dir, out, "svd-llm", path))
    fragment = "is not UTF-8 text" if kind == "undecodable" else "does not look like text"
    assert_user_error(capsys, code, str(path), fragment)
    assert_nothing_written(out)


def test_binary_eval_data(capsys, tiny_llama_dir, binary_file):
    code = run("eval", tiny_llama_dir, "--data", binary_file, "--seq-len", "32")
    assert_user_error(capsys, code, str(binary_file), "is not UTF-8 text")


def test_binary_finetune_data(capsys, tmp_path, gpt2_128_out, binary_file):
    out = tmp_path / "ft"
    code = run(
        "finetune", gpt2_128_out, "--out", out, "--data", binary_file,
        "--train-seq-len", "32", "--eval-data", "",
    )  # fmt: skip
    assert_user_error(capsys, code, str(binary_file), "is not UTF-8 text")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- 4. tied targets


def test_tied_lm_head_only_is_refused(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    code = run(*compress_args(tiny_llama_dir, out, extra=["--targets", "lm_head"]))
    assert_user_error(capsys, code, "can save no parameters", "tied", "lm_head", "q_proj")
    assert_nothing_written(out)


def test_tied_lm_head_only_is_refused_by_the_api():
    import rankcut
    from rankcut.methods import SvdConfig

    from .conftest import tiny_llama

    config = SvdConfig(ratio=0.3, targets=["lm_head"], allocation="uniform")
    with pytest.raises(RankcutError, match="can save no parameters"):
        rankcut.compress(tiny_llama(), config, progress=False)


# --------------------------------------------------------------------------- 5. rank_pattern


def test_rank_pattern_above_full_rank(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    extra = ["--option", 'rank_pattern={"k_proj": 40}']
    code = run(*compress_args(tiny_llama_dir, out, extra=extra))
    line = assert_user_error(capsys, code, "model.layers.0.self_attn.k_proj", "32 x 64")
    assert "at most rank 32" in line
    assert_nothing_written(out)


# --------------------------------------------------------------------------- 6. export


def test_export_onto_its_input_is_refused(capsys, tmp_path, gpt2_128_out):
    folder = tmp_path / "compressed"
    shutil.copytree(gpt2_128_out, folder)
    before = sorted(p.name for p in folder.iterdir())
    code = run("export", folder, "--merge", "--out", folder, "--overwrite")
    assert_user_error(capsys, code, "is the input folder")
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "rankcut.json").is_file()


# --------------------------------------------------------------------------- 7. smaller ones


def test_zero_samples(capsys, tmp_path, tiny_llama_dir, calib_file):
    out = tmp_path / "out"
    args = compress_args(tiny_llama_dir, out, "svd-llm", calib_file, extra=["--samples", "0"])
    code = run(*args)
    assert_user_error(capsys, code, "'samples' (--samples) must be at least 1, got 0")
    assert_nothing_written(out)


@pytest.mark.parametrize("name", ["uniform", "energy"])
def test_budget_error_hint_fits_the_allocation(name, monkeypatch):
    """Uniform ranks ignore min_rank_fraction: suggesting it there would mislead.

    No real allocator overshoots on these shapes, so one that spends every matrix at
    full rank stands in for it under each name.
    """
    import dataclasses

    from rankcut.rank import ALLOCATORS

    def full(inp):
        return {k: min(shape) for k, shape in inp.shapes.items()}

    fake = dataclasses.replace(ALLOCATORS[name], fn=full, needs=frozenset())
    monkeypatch.setitem(ALLOCATORS, name, fake)
    inp = AllocationInput(shapes={"a": (64, 64), "b": (64, 64)}, ratio=0.3)
    with pytest.raises(RankcutError, match="cannot meet the budget") as err:
        allocate(name, inp)
    assert ("min_rank_fraction" in str(err.value)) == (name != "uniform")


def test_nan_norm_weight_names_non_finite_values(capsys, tmp_path, tiny_llama_dir, calib_file):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tmp_path / "nan-norm"
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    out = tmp_path / "out"
    code = run(*compress_args(path, out, "svd-llm", calib_file))
    line = assert_user_error(capsys, code, "non-finite", "weights or activations")
    assert "overflowed" not in line
    assert_nothing_written(out)


# --------------------------------------------------------------------------- hub ids


def test_unreachable_hub_id_fails_at_once(capsys, tmp_path, monkeypatch):
    """No network and not cached: one line after one short probe, not transformers'
    retries; nothing is written."""
    from rankcut.models import sources

    sources._unreachable.cache_clear()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    out = tmp_path / "out"
    code = run("compress", "--model", "some-org/some-model", "--ratio", "0.2", "--out", out)
    assert_user_error(capsys, code, "cannot download 'some-org/some-model'", "127.0.0.1:9")
    assert_nothing_written(out)
    code = run("eval", "some-org/some-model")
    assert_user_error(capsys, code, "does not answer", "HF_HUB_OFFLINE")
    sources._unreachable.cache_clear()


def test_compress_eval_data_fits_the_model_positions(tmp_path, gpt2_128_dir, eval_file):
    """The report's 512-token windows are cut to a model's 128 positions (no IndexError)."""
    out = tmp_path / "out"
    assert run(*compress_args(gpt2_128_dir, out, extra=("--eval-data", eval_file))) == 0
    ppl = json.loads((out / "rankcut.json").read_text())["perplexity"]
    assert ppl["seq_len"] == 128 and ppl["compressed"] > 0


def test_error_line_does_not_share_a_line_with_a_progress_bar(monkeypatch, capsys):
    """An error raised while a bar is drawn is printed on a line of its own."""
    from tqdm.auto import tqdm

    import rankcut.cli.eval as eval_command
    from rankcut.cli import main

    bars = []

    def failing(args):
        bars.append(tqdm(total=10, desc="working", leave=False, mininterval=0))
        bars[-1].update(3)
        raise RankcutError("boom")

    monkeypatch.setattr(eval_command, "cmd_eval", failing)
    assert main(["eval", "anything"]) == 2  # no -q: the bar is drawn
    err = capsys.readouterr().err
    assert "working" in err  # the bar was really drawn on stderr
    line = err.rstrip("\n").split("\n")[-1]
    assert line.split("\r")[-1] == "rankcut: error: boom"
    assert line.split("\r")[-2].strip() == ""  # the bar's text was cleared first
    assert bars[0].disable  # closed
