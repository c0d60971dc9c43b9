"""Atomic writes: a file or a folder appears under its final name only when complete.

Everything rankcut writes goes through here, so that an interrupted run never leaves a
file or folder that a reader would accept: a temporary sibling (named after the
process) is written, then renamed into place with ``os.replace``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

from ..errors import RankcutError


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Absolute path of ``out`` if a save may write there, else a ``RankcutError``.

    Example:
        >>> check_output_dir("runs/new-folder").name
        'new-folder'
    """
    out = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        # The folder is replaced by a rename: it must not be (or hold) the working folder.
        raise RankcutError(
            f"output folder {out} is the current folder or holds it; name a subfolder"
        )
    if out.exists() and not out.is_dir():
        raise RankcutError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RankcutError(f"output folder {out} exists and is not empty (use --overwrite)")
    return out


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "state.json"
        >>> atomic_write_text(p, "{}")
        >>> p.read_text()
        '{}'
    """
    path = Path(path)
    tmp = _tmp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike) -> None:
    """``safetensors`` file at ``path``, written through a temporary sibling.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> atomic_save_tensors({"x": torch.zeros(2)}, p)
        >>> p.is_file()
        True
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_sibling(path)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def replace_dir(src: Path, out: Path) -> None:
    """Move the complete folder ``src`` to ``out``, replacing what is there.

    The old folder is first renamed aside (so ``out`` is never half old, half new), then
    removed.
    """
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(src, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder that replaces ``out`` only if the block succeeds.

    Raises:
        RankcutError: if ``out`` exists, is not empty, and ``overwrite`` is False.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "result"
        >>> with atomic_dir(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> (out / "a.txt").read_text()
        'done'
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
