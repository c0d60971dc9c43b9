"""Loading refuses what it cannot trust: code in model folders, broken files, edited JSON.

Each case is one ``RankcutError`` line (exit 2 from the CLI, ``rankcut: error: ...``),
raised before anything is written, and code shipped in a model folder never runs, with
or without a terminal to answer transformers' "run the custom code? [y/N]" prompt.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import sys
import time
from pathlib import Path

import pytest

import rankcut
from rankcut import io
from rankcut.cli import main
from rankcut.errors import RankcutError
from rankcut.methods import SvdConfig

from .conftest import tiny_llama

Q0 = "model.layers.0.self_attn.q_proj"
EVAL = ["--tokens", "64", "--seq-len", "16"]
REFUSAL = "rankcut does not run code from model folders"

#: Code that marks, when it runs, that it ran: what a hostile model folder would ship.
EVIL_CODE = """\
import pathlib

pathlib.Path({marker!r}).write_text("the model folder's code ran")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


# -- folders ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_tokenizer):
    """Pristine folders, copied by each test: a HF folder, a sharded one, a rankcut output."""
    root = tmp_path_factory.mktemp("sources")
    model = tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(root / "hf")
    tiny_tokenizer.save_pretrained(root / "hf")
    model.save_pretrained(root / "sharded", max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(root / "sharded")
    rankcut.compress(model, SvdConfig(ratio=0.5), progress=False)
    rankcut.save(model, root / "rankcut", tokenizer=tiny_tokenizer)
    return root


@pytest.fixture
def work(tmp_path):
    """An empty folder holding the copies; ``snapshot(work)`` proves nothing was written."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def copy(sources: Path, work: Path, name: str) -> Path:
    return Path(shutil.copytree(sources / name, work / name))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def plant_code(folder: Path, where: str, marker: Path) -> None:
    """Ship ``evil.py`` in ``folder`` and point an ``auto_map`` of ``where`` at it."""
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    if where == "config.json":

        def edit(cfg):
            # A model type transformers does not know: only the folder's code could load it.
            cfg["model_type"] = "evil-llama"
            cfg["auto_map"] = {
                "AutoConfig": "evil.EvilConfig",
                "AutoModelForCausalLM": "evil.EvilForCausalLM",
            }

    else:

        def edit(cfg):
            cfg["tokenizer_class"] = "EvilTokenizer"
            cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}

    edit_json(folder / where, edit)


def cli(capsys, *args) -> tuple[int, str]:
    """Run ``rankcut -q ARGS`` in this process (no terminal); exit code and the error line."""
    code = main(["-q", *map(str, args)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("rankcut: error: "), captured.err
    assert captured.out == ""
    return code, lines[0]


def run_in_pty(argv: list[str], answer: bytes, env: dict, timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal, typing ``answer``; exit code and all output."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.write(fd, answer)  # buffered by the terminal until the prompt reads it
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def pty_env(tmp_path: Path) -> dict:
    # transformers copies a folder's code into HF_MODULES_CACHE before importing it: keep
    # that inside the test's folder.
    return {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }


# -- 1. never execute code from a model folder --------------------------------------------
CODE_CASES = [("hf", "config.json"), ("hf", "tokenizer_config.json"), ("rankcut", "config.json")]


@pytest.mark.parametrize(("kind", "where"), CODE_CASES)
@pytest.mark.parametrize(
    "entry",
    [rankcut.load, rankcut.load_tokenizer, lambda f: io.build_skeleton(f, "cpu")],
    ids=["load", "load_tokenizer", "build_skeleton"],  # the last is what streaming reads
)
def test_api_refuses_auto_map(sources, work, tmp_path, kind, where, entry):
    folder = copy(sources, work, kind)
    marker = tmp_path / "marker"
    plant_code(folder, where, marker)
    before = snapshot(work)
    with pytest.raises(RankcutError) as info:
        entry(folder)
    message = str(info.value)
    assert "\n" not in message and REFUSAL in message
    assert f"{folder / where} has an auto_map" in message
    assert "evil.Evil" in message  # the entry is named
    assert not marker.exists()
    assert snapshot(work) == before


@pytest.mark.parametrize(("kind", "where"), CODE_CASES)
def test_cli_refuses_auto_map_without_terminal(
    sources, work, tmp_path, capsys, eval_file, kind, where
):
    folder = copy(sources, work, kind)
    marker = tmp_path / "marker"
    plant_code(folder, where, marker)
    before = snapshot(work)
    code, line = cli(capsys, "eval", folder, "--data", eval_file, *EVAL)
    assert code == 2
    assert line.startswith(f"rankcut: error: {folder / where} has an auto_map (")
    assert line.endswith(REFUSAL)
    assert not marker.exists()
    assert snapshot(work) == before


def test_planted_code_runs_when_transformers_is_asked_in_a_terminal(sources, work, tmp_path):
    """The fixture is live: transformers' own prompt, answered "y", runs the code."""
    folder = copy(sources, work, "hf")
    marker = tmp_path / "marker"
    plant_code(folder, "config.json", marker)
    script = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(folder)!r})"
    code, out = run_in_pty([sys.executable, "-c", script], b"y\n", pty_env(tmp_path))
    assert "Do you wish to run the custom code?" in out
    assert marker.exists(), out


@pytest.mark.parametrize(("kind", "where"), CODE_CASES)
def test_cli_refuses_auto_map_in_a_terminal_answering_yes(
    sources, work, tmp_path, eval_file, kind, where
):
    folder = copy(sources, work, kind)
    marker = tmp_path / "marker"
    plant_code(folder, where, marker)
    before = snapshot(work)
    argv = [sys.executable, "-m", "rankcut", "-q", "eval", str(folder), "--data", str(eval_file)]
    code, out = run_in_pty([*argv, *EVAL], b"y\ny\n", pty_env(tmp_path))
    assert code == 2, out
    lines = [line for line in out.replace("\r", "").splitlines() if line.strip() not in ("y", "")]
    assert len(lines) == 1 and lines[0].startswith("rankcut: error: "), out
    assert REFUSAL in lines[0] and "[y/N]" not in out
    assert not marker.exists()
    assert snapshot(work) == before


def test_plain_folders_still_load(sources, work):
    """No auto_map, no refusal: the checks only read two small JSON files."""
    for kind in ("hf", "sharded", "rankcut"):
        folder = copy(sources, work, kind)
        assert rankcut.load(folder) is not None
        assert len(rankcut.load_tokenizer(folder)) > 0


# -- 2. one line instead of a traceback ---------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def break_index(edit):
    def apply(folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        index.write_text(edit(json.loads(index.read_text())))

    return apply


def _shard_missing(index: dict) -> str:
    return json.dumps({**index, "weight_map": {**index["weight_map"], "x": "gone.safetensors"}})


def _tensor_moved(index: dict) -> str:
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    return json.dumps({**index, "weight_map": {**index["weight_map"], name: shards[1]}})


BROKEN = {
    "hf-truncated-weights": (
        "hf",
        lambda f: truncate(f / "model.safetensors"),
        "cannot read the safetensors file",
    ),
    "hf-empty-weights": (
        "hf",
        lambda f: (f / "model.safetensors").write_bytes(b""),
        "header too small",
    ),
    "rankcut-truncated-weights": (
        "rankcut",
        lambda f: truncate(f / "model.safetensors"),
        "incomplete metadata",
    ),
    "hf-no-weights": (
        "hf",
        lambda f: (f / "model.safetensors").unlink(),
        "has config.json but no weights",
    ),
    "rankcut-no-weights": (
        "rankcut",
        lambda f: (f / "model.safetensors").unlink(),
        "holds no model.safetensors",
    ),
    "index-not-json": ("sharded", break_index(lambda i: "{not json"), "cannot read"),
    "index-no-weight-map": (
        "sharded",
        break_index(lambda i: json.dumps({"metadata": {}})),
        "has no 'weight_map'",
    ),
    "index-weight-map-list": (
        "sharded",
        break_index(lambda i: json.dumps({"weight_map": []})),
        "has no 'weight_map'",
    ),
    "index-missing-shard": ("sharded", break_index(_shard_missing), "lists shard files missing"),
    "index-shard-outside": (
        "sharded",
        break_index(lambda i: json.dumps({"weight_map": {"a": "../../etc/passwd"}})),
        "invalid shard",
    ),
    "index-tensor-not-in-shard": ("sharded", break_index(_tensor_moved), "which does not hold it"),
}

#: ``rankcut.json`` fields edited by hand, and what the one line says.
META_EDITS = {
    "dtype-unknown": ({"dtype": "float99"}, "invalid dtype 'float99'"),
    "dtype-integer": ({"dtype": "int8"}, "invalid dtype 'int8'"),
    "dtype-not-a-dtype": ({"dtype": "Tensor"}, "invalid dtype 'Tensor'"),
    "dtype-wrong": (
        {"dtype": "bfloat16"},
        "rankcut.json says dtype 'bfloat16' but model.safetensors stores 'float32'",
    ),
    "architecture-unknown": (
        {"architecture": "NoSuchForCausalLM"},
        "transformers has no model class 'NoSuchForCausalLM'",
    ),
    "architecture-not-a-model": (
        {"architecture": "AutoTokenizer"},
        "'AutoTokenizer' is not a transformers model class",
    ),
    "architecture-other-model": (
        {"architecture": "GPT2LMHeadModel"},
        "'GPT2LMHeadModel' does not fit config.json (model_type 'llama', LlamaConfig)",
    ),
    "architecture-not-a-string": ({"architecture": 3}, "'architecture'"),
}
BROKEN.update(
    {
        f"rankcut-{case}": ("rankcut", lambda f, c=changes: _meta(f, **c), fragment)
        for case, (changes, fragment) in META_EDITS.items()
    }
)


def _meta(folder: Path, **changes) -> None:
    edit_json(folder / "rankcut.json", lambda m: m.update(changes))


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_is_one_line(sources, work, case):
    kind, breakage, fragment = BROKEN[case]
    folder = copy(sources, work, kind)
    breakage(folder)
    before = snapshot(work)
    with pytest.raises(RankcutError) as info:
        rankcut.load(folder)
    assert "\n" not in str(info.value) and fragment in str(info.value)
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "case",
    [
        "hf-truncated-weights",
        "rankcut-truncated-weights",
        "hf-no-weights",
        "index-missing-shard",
        "rankcut-dtype-wrong",
        "rankcut-architecture-other-model",
    ],
)
def test_broken_folder_cli_exit_2(sources, work, capsys, eval_file, case):
    kind, breakage, fragment = BROKEN[case]
    folder = copy(sources, work, kind)
    breakage(folder)
    before = snapshot(work)
    code, line = cli(capsys, "eval", folder, "--data", eval_file, *EVAL)
    assert code == 2 and fragment in line
    assert snapshot(work) == before


@pytest.mark.parametrize("truncated", [False, True])
def test_bare_safetensors_file_as_model(sources, work, capsys, eval_file, truncated):
    weights = Path(shutil.copy(sources / "hf" / "model.safetensors", work / "model.safetensors"))
    if truncated:
        truncate(weights)
    before = snapshot(work)
    code, line = cli(capsys, "eval", weights, "--data", eval_file, *EVAL)
    assert code == 2
    assert line == (
        f"rankcut: error: {str(weights)!r} is a bare weights file; give the folder that holds "
        "it with its config.json (a Hugging Face model folder or a rankcut output)"
    )
    with pytest.raises(RankcutError, match="bare weights file"):
        rankcut.load(weights)
    assert snapshot(work) == before


def test_streaming_reader_checks_the_index_too(sources, work):
    folder = copy(sources, work, "sharded")
    break_index(_shard_missing)(folder)
    with pytest.raises(RankcutError, match="lists shard files missing"):
        io.CheckpointReader(folder)


# -- 3. rankcut.json checked against the tensors ------------------------------------------
def q0_rank(folder: Path) -> int:
    return json.loads((folder / "rankcut.json").read_text())["layers"][Q0]["rank"]


def _bump_rank(meta: dict) -> None:
    meta["layers"][Q0]["rank"] += 1


def test_hand_edited_rank_names_the_layer(sources, work, capsys, eval_file):
    folder = copy(sources, work, "rankcut")
    r = q0_rank(folder)
    edit_json(folder / "rankcut.json", _bump_rank)
    before = snapshot(work)
    with pytest.raises(RankcutError) as info:
        rankcut.load(folder)
    assert str(info.value) == (
        f"rankcut.json and model.safetensors do not match: layer {Q0!r} (LowRankLinear, "
        f"64 -> 64, rank {r + 1}) needs '{Q0}.down.weight' of shape [{r + 1}, 64], "
        f"stored [{r}, 64]"
    )
    code, line = cli(capsys, "eval", folder, "--data", eval_file, *EVAL)
    assert code == 2 and line == f"rankcut: error: {info.value}"
    assert snapshot(work) == before


def test_edited_config_names_the_tensor(sources, work):
    folder = copy(sources, work, "rankcut")
    edit_json(folder / "config.json", lambda c: c.update(vocab_size=c["vocab_size"] + 1))
    with pytest.raises(
        RankcutError,
        match=r"config.json and model.safetensors do not match: "
        r"'model.embed_tokens.weight' needs shape \[\d+, 64\], stored",
    ):
        rankcut.load(folder)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m["layers"][Q0].update(bias="no"), "invalid layer entry"),
        (lambda m: m["layers"][Q0].update(rank=True), "invalid layer entry"),
        (lambda m: m["layers"][Q0].pop("out_features"), "invalid layer entry"),
    ],
    ids=["bias-not-bool", "rank-bool", "no-out-features"],
)
def test_invalid_layer_fields(sources, work, edit, fragment):
    folder = copy(sources, work, "rankcut")
    edit_json(folder / "rankcut.json", edit)
    with pytest.raises(RankcutError, match=fragment):
        rankcut.load(folder)


def _stored_ranks(meta: dict) -> dict:
    return {name: spec["rank"] for name, spec in meta["layers"].items()}


def test_stored_ranks_agreeing_with_layers_load(sources, work):
    folder = copy(sources, work, "rankcut")
    edit_json(folder / "rankcut.json", lambda m: m.update(ranks=_stored_ranks(m)))
    meta = io.read_meta(folder)
    assert io.folder.layer_ranks(meta) == meta["ranks"]
    assert rankcut.load(folder) is not None


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (
            lambda m: m.update(ranks={**_stored_ranks(m), Q0: 3}),
            f"'ranks' disagrees with 'layers' for 1 matrices (first {Q0!r}: ranks says 3, "
            "layers says {r})",
        ),
        (
            lambda m: m.update(ranks={k: v for k, v in _stored_ranks(m).items() if k != Q0}),
            f"(first {Q0!r}: ranks says None, layers says {{r}})",
        ),
        (lambda m: m.update(ranks=[1, 2]), "'ranks' disagrees with 'layers'"),
    ],
    ids=["rank-differs", "layer-missing", "not-an-object"],
)
def test_stored_ranks_disagreeing_with_layers(sources, work, capsys, eval_file, edit, fragment):
    folder = copy(sources, work, "rankcut")
    fragment = fragment.format(r=q0_rank(folder))
    edit_json(folder / "rankcut.json", edit)
    before = snapshot(work)
    with pytest.raises(RankcutError) as info:
        rankcut.load(folder)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    code, line = cli(capsys, "eval", folder, "--data", eval_file, *EVAL)
    assert code == 2 and fragment in line
    assert snapshot(work) == before


def test_layer_ranks_is_derived_from_layers():
    meta = {"layers": {"a": {"rank": 4}, "b": {"rank": 2}}, "ranks": {"a": 99}}
    assert io.folder.layer_ranks(meta) == {"a": 4, "b": 2}
