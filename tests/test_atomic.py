"""Atomic outputs leave nothing behind: SIGKILL a save mid-write, rerun, compare bytes.

Each fault test runs the write in a child process that stops (sleeps) at a chosen point
inside the temporary folder, SIGKILLs it there (no clean-up can run), checks what it
left, reruns the same write here and compares every file with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch

from rankcut.io.atomic import atomic_dir, process_alive, remove_stale_siblings, sibling
from rankcut.methods import SvdLlmConfig

from .test_streaming import calib, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# The child: the same writes as the tests below, with a pause (marker file, then sleep)
# patched in at POINT so that the parent can SIGKILL it exactly there.
CHILD = textwrap.dedent(
    """
    import os, sys, time, types
    from pathlib import Path

    mode, point, marker, out, *rest = sys.argv[1:]

    def pause():
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)

    import safetensors.torch as st
    import rankcut.io.atomic as atomic
    import rankcut.report as report

    real_save, real_render, real_rmtree = st.save_file, report.render, atomic.shutil.rmtree

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if point == "weights" and ("model-00002" in filename or mode == "save"):
            pause()  # the tensors are in the temporary file, not yet renamed

    def render(*args, **kwargs):
        files = real_render(*args, **kwargs)
        if point == "report":
            pause()  # everything but the report is in the temporary folder
        return files

    def rmtree(path, *args, **kwargs):
        if point == "old" and ".old-" in str(path):
            pause()  # the new output is in place, the old one not yet removed
        return real_rmtree(path, *args, **kwargs)

    st.save_file, report.render = save_file, render
    atomic.shutil = types.SimpleNamespace(rmtree=rmtree)
    from tests import test_atomic

    test_atomic.write(mode, Path(out), *rest, overwrite=point == "old")
    """
)


def write(mode: str, out: Path, ckpt: str | None = None, overwrite: bool = False) -> None:
    """The write under test, the same in the child and in the parent."""
    from rankcut.runner import RunResult, _save
    from rankcut.streaming import stream_compress

    config = SvdLlmConfig(ratio=0.4, pipeline="sequential", allocation="uniform")
    if mode == "stream":
        stream_compress(ckpt, config, calib(4, 16), out, progress=False, overwrite=overwrite)
        return
    import rankcut

    from .conftest import tiny_llama

    model = tiny_llama()
    rankcut.compress(model, config, calib(4, 16), progress=False)
    extra = {"source_model": "tiny", "calibration": {"data": "random", "samples": 4}}
    _save(RunResult(out, None), model, None, overwrite, extra, '{"recipe": 1}\n')


def kill_during(mode: str, point: str, out: Path, *rest: str) -> int:
    """Run ``write`` in a child, SIGKILL it at ``point``; return the child's PID."""
    marker = out.parent / f"paused-{point}"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, point, str(marker), str(out), *rest],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, f"the child ended before {point} (rc {child.returncode})"
        assert time.monotonic() < deadline, f"the child never reached {point}"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    marker.unlink()
    return child.pid


def timeless(meta: dict) -> dict:
    """``rankcut.json`` without what the clock decides."""
    meta = dict(meta)
    meta.pop("compression_seconds", None)
    if "streaming" in meta:
        meta["streaming"] = {**meta["streaming"], "layer_seconds": None}
    return meta


def assert_same_files(got: Path, ref: Path) -> None:
    """Same file names, same bytes (``rankcut.json``: same content but the timings)."""
    names = sorted(p.relative_to(got).as_posix() for p in got.rglob("*"))
    assert names == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*"))
    assert "report.md" in names and "rankcut.json" in names
    for name in names:
        a, b = got / name, ref / name
        if name == "rankcut.json":
            assert timeless(json.loads(a.read_text())) == timeless(json.loads(b.read_text()))
        elif a.is_file():
            assert a.read_bytes() == b.read_bytes(), name


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


@pytest.fixture(scope="module")
def saved_ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "model"
    write("save", out)
    return out


@pytest.mark.parametrize("point", ["weights", "report", "old"])
def test_killed_save_then_rerun_leaves_nothing_and_same_bytes(tmp_path, saved_ref, point):
    out = tmp_path / "model"
    if point == "old":
        write("save", out)  # an output to replace: the kill comes while removing it
    pid = kill_during("save", point, out)
    if point == "old":
        assert leftovers(tmp_path) == [f".model.old-{pid}"]
        assert_same_files(out, saved_ref)  # the new output was already in place
    else:
        # Killed inside the temporary folder: no output, not even one without a report.
        assert leftovers(tmp_path) == [f".model.tmp-{pid}"] and not out.exists()
    write("save", out, overwrite=True)
    assert leftovers(tmp_path) == []
    assert_same_files(out, saved_ref)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), layers=2)


@pytest.fixture(scope="module")
def streamed_ref(tmp_path_factory, ckpt) -> Path:
    out = tmp_path_factory.mktemp("sref") / "out"
    write("stream", out, str(ckpt))
    return out


@pytest.mark.parametrize("point", ["weights", "report"])
def test_killed_stream_then_rerun_leaves_nothing_and_same_bytes(
    tmp_path, ckpt, streamed_ref, point
):
    out = tmp_path / "out"
    pid = kill_during("stream", point, out, str(ckpt))
    assert not out.exists()
    assert (tmp_path / ".out.partial").is_dir()  # the resume point is kept
    if point == "weights":  # the shard being written when killed
        stale = [p.name for p in (tmp_path / ".out.partial").iterdir() if p.name.startswith(".")]
        assert len(stale) == 1 and fnmatch(stale[0], f".model-00002-of-*.safetensors.tmp-{pid}")
    write("stream", out, str(ckpt))
    assert leftovers(tmp_path) == []
    assert_same_files(out, streamed_ref)


def test_a_live_process_sibling_is_never_removed(tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        assert process_alive(live.pid) and not process_alive(dead.pid)
        for pid, kind in [(live.pid, "tmp"), (live.pid, "old"), (os.getpid(), "old")]:
            sibling(out, kind, pid).mkdir()
        sibling(out, "tmp", dead.pid).mkdir()
        sibling(out, "old", dead.pid).write_text("a file")
        (tmp_path / f".other.tmp-{dead.pid}").mkdir()  # another output's: not out's
        with atomic_dir(out) as tmp:
            assert tmp == sibling(out)
            (tmp / "a.txt").write_text("done")
        kept = {f".out.tmp-{live.pid}", f".out.old-{live.pid}", f".out.old-{os.getpid()}"}
        assert set(leftovers(tmp_path)) == kept | {f".other.tmp-{dead.pid}"}
        assert (out / "a.txt").read_text() == "done"
    finally:
        live.kill()
        live.wait()
    assert {p.name for p in remove_stale_siblings(out)} == kept - {f".out.old-{os.getpid()}"}


def test_output_folder_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert mode == 0o750 and (tmp_path / "out").stat().st_mode & 0o777 == mode


def test_nested_atomic_dir_writes_in_place_and_the_outer_commits(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            with atomic_dir(tmp) as inner:
                assert inner == tmp
                (inner / "a.txt").write_text("inner")
            raise RuntimeError("the outer block fails after the inner one")
    assert not out.exists() and leftovers(tmp_path) == []
    with atomic_dir(out) as tmp:
        with atomic_dir(tmp) as inner:
            (inner / "a.txt").write_text("inner")
        (tmp / "b.txt").write_text("outer")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    assert leftovers(tmp_path) == []


def test_tensors_written_atomically_clean_stale_files(tmp_path):
    from rankcut.io import atomic_save_tensors

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "x.safetensors"
    sibling(path, "tmp", dead.pid).write_bytes(b"half a file")
    atomic_save_tensors({"x": torch.zeros(2)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
