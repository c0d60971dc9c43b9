"""``rankcut.run`` reproduces ``rankcut compress``; streaming and finetune from Python."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankcut
from rankcut import CompressRecipe
from rankcut.cli import main
from rankcut.errors import RankcutError
from rankcut.recipe import FinetuneOptions
from rankcut.runner import RunResult, finetune_folder

#: rankcut.json entries that are wall-clock timings, the only ones two identical runs
#: may disagree on: the compression time, the time of each phase (loading, statistics,
#: factorization, evaluation, ...) and the recovery's training time.
TIMINGS = {("compression_seconds",), ("phases",), ("recovery", "seconds")}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def _without_timings(meta: dict) -> dict:
    meta = json.loads(json.dumps(meta))
    for path in TIMINGS:
        *parents, leaf = path
        node = meta
        for key in parents:
            node = node[key]
        node.pop(leaf)
    return meta


def _differing(a: dict, b: dict, prefix: tuple = ()) -> set[tuple]:
    """Paths of the entries of two JSON objects that differ."""
    paths = set()
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            paths |= _differing(x, y, (*prefix, key))
        elif x != y:
            paths.add((*prefix, key))
    return paths


def _untimed(text: str) -> str:
    return re.sub(r"\b[\d.]+ s\b", "T s", text)


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return rankcut.load(folder)(input_ids=ids).logits


def test_run_reproduces_the_cli(tmp_path, tiny_llama_dir, calib_file, eval_file, capsys):
    """Calibration from text and sampled text, recovery on sampled windows, evaluation."""
    first = tmp_path / "first"
    args = ["compress", "--model", tiny_llama_dir, "--method", "svd-llm", "--ratio", "0.3"]
    args += ["--calib", f"{calib_file}+generated", "--samples", "4", "--seq-len", "32"]
    args += ["--recover", "2", "--recover-seq-len", "32", "--eval-data", eval_file]
    assert main(["-q", *map(str, args), "--out", str(first)]) == 0
    capsys.readouterr()
    # The same recipe file through the CLI and through Python.
    cli, py = tmp_path / "cli", tmp_path / "py"
    recipe_file = first / "recipe.json"
    assert main(["-q", "compress", "--recipe", str(recipe_file), "--out", str(cli)]) == 0
    printed = capsys.readouterr().out
    recipe = CompressRecipe.from_file(recipe_file).merged({"out": str(py)})
    result = rankcut.run(recipe, progress=False)

    assert isinstance(result, RunResult) and result.out == py
    a, b = (json.loads((d / "rankcut.json").read_text()) for d in (cli, py))
    assert not [p for p in _differing(a, b) if not any(p[: len(t)] == t for t in TIMINGS)]
    assert _without_timings(a) == _without_timings(b) == _without_timings(result.meta)
    assert a["recovery"]["data"] == "generated" and "perplexity" in a
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(cli, ids), _logits(py, ids), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(result.model(input_ids=ids).logits, _logits(py, ids))
    # recipe.json: the same resolved recipe but for the output folder.
    saved = {d: json.loads((d / "recipe.json").read_text()) for d in (first, cli, py)}
    assert saved[cli] == {**saved[first], "out": str(cli)}
    assert saved[py] == {**saved[first], "out": str(py)} == result.recipe.to_dict()
    # What the CLI printed is what run() returns (timings apart), plus where it saved.
    assert _untimed(printed) == _untimed(f"{result.summary()}\nsaved to {cli}\n")
    assert [line.split()[0] for line in result.lines] == ["method", "recovery:", "held-out"]


def test_run_streams_a_safetensors_folder(tmp_path, tiny_llama_dir, calib_file):
    base = CompressRecipe(
        model=str(tiny_llama_dir),
        method="svd-llm",
        ratio=0.3,
        calib=str(calib_file),
        samples=4,
        seq_len=32,
        pipeline="sequential",
        offload_mb=0,
    )
    result = rankcut.run(base.merged({"out": "streamed"}), progress=False)
    assert result.model is None  # never whole in memory
    assert result.meta["streaming"]["activations_spilled"]
    # Not chosen: the streaming pipeline falls back from global to uniform ...
    assert result.meta["method_config"]["allocation"] == "uniform"
    # ... and the saved recipe still says "not chosen", so it repeats that decision.
    saved = CompressRecipe.from_file(Path("streamed") / "recipe.json")
    assert saved.allocation is None and saved.calib == str(calib_file)
    assert "streamed 2 layers" in result.summary()
    # Chosen explicitly: refused.
    with pytest.raises(RankcutError, match="allocation 'global'"):
        rankcut.run(base.merged({"out": "refused", "allocation": "global"}), progress=False)
    assert not Path("refused").exists()
    # in_memory: the same recipe, whole model, global allocation.
    whole = rankcut.run(base.merged({"out": "whole", "in_memory": True}), progress=False)
    assert whole.model is not None
    assert whole.meta["method_config"]["allocation"] == "global"


def test_run_checks_before_heavy_work(tmp_path, tiny_llama_dir):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    recipe = CompressRecipe(model=str(tiny_llama_dir), method="svd", out=str(busy))
    with pytest.raises(RankcutError, match="not empty"):
        rankcut.run(recipe)
    with pytest.raises(RankcutError, match="unknown option"):
        rankcut.run(recipe.merged({"option": {"nosuch": 1}}), overwrite=True)
    with pytest.raises(RankcutError, match="distill"):  # before compressing, not after
        rankcut.run(recipe.merged({"recover": 2, "distill": 2.0}), overwrite=True)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_finetune_folder(tmp_path, tiny_llama_dir, calib_file, eval_file):
    recipe = CompressRecipe(
        model=str(tiny_llama_dir), method="svd", ratio=0.4, allocation="uniform", out="c"
    )
    rankcut.run(recipe, progress=False)
    options = FinetuneOptions(
        steps=2,
        data=str(calib_file),
        train_seq_len=32,
        distill=0.0,
        eval_data=str(eval_file),
        eval_tokens=128,
        eval_seq_len=32,
    )
    result = finetune_folder("c", options, out="f", progress=False)
    assert result.recipe is None and result.out == Path("f")
    recovery = result.meta["recovery"]
    assert recovery["config"]["steps"] == 2 and recovery["data"] == str(calib_file)
    assert recovery["perplexity_after"] > 1
    assert result.lines[0].startswith("recovery: 2 steps")
    assert result.lines[-1].startswith(f"held-out perplexity ({eval_file})")
    # The compress recipe travels with the folder; the source folder is untouched.
    assert (Path("f") / "recipe.json").read_text() == (Path("c") / "recipe.json").read_text()
    assert "recovery" not in rankcut.io.read_meta("c")
    with pytest.raises(RankcutError, match="rankcut output folder"):
        finetune_folder(tiny_llama_dir, options)


def test_run_is_a_lazy_export():
    code = (
        "import sys, rankcut; lazy = 'rankcut.runner' not in sys.modules; "
        "rankcut.run, rankcut.CompressRecipe; print(lazy, 'rankcut.runner' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
