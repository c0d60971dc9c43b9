"""Atomic writes: a file or a folder appears under its final name only when complete.

Everything rankcut writes goes through here, so that an interrupted run never leaves a
file or folder that a reader would accept: a temporary sibling named after the writing
process (``.OUT.tmp-<pid>``) is written, then renamed into place with ``os.replace``.

Nothing is left behind either: a run killed with SIGKILL cannot clean up, so before
every write the siblings of the output left by processes that are gone
(``.OUT.tmp-<pid>``, ``.OUT.old-<pid>``) are removed (``remove_stale_siblings``). A
live process's sibling is never touched: another run may be writing it right now.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

from ..errors import RankcutError

logger = logging.getLogger(__name__)

#: The kinds of temporary sibling: being written, and an old output being removed.
SIBLING_KINDS = ("tmp", "old")

# Temporary folders that an ``atomic_dir`` of this process is filling right now: an
# ``atomic_dir`` on one of them writes in place (the outer one commits), see below.
_ACTIVE: set[Path] = set()


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
    check_writable(out)
    return out


def check_writable(out: str | os.PathLike) -> None:
    """A ``RankcutError`` unless a folder can be created at ``out``; nothing is left behind.

    Checked before any model is loaded, so that an unwritable ``--out`` (``/proc/x``, a
    path under an existing file, a read-only disk) fails in a second, not after hours of
    compression. A temporary folder is made and removed in the nearest existing
    ancestor, which is where the save creates its own temporary sibling.

    ``check_output_dir`` runs it; an in-place rewrite (``finetune`` without ``--out``)
    calls it alone.

    Example:
        >>> check_writable("runs/new-folder")
    """
    out = Path(out).expanduser().absolute()
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RankcutError(f"cannot create output folder {out}: {parent} is a file")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise RankcutError(
            f"cannot write output folder {out}: {err.strerror or err} in {parent}"
        ) from None


def sibling(path: str | os.PathLike, kind: str = "tmp", pid: int | None = None) -> Path:
    """The temporary sibling ``.NAME.<kind>-<pid>`` of ``path`` (default: this process).

    Example:
        >>> sibling("runs/out", "tmp", 42).name
        '.out.tmp-42'
    """
    if kind not in SIBLING_KINDS:
        raise ValueError(f"kind must be one of {SIBLING_KINDS}, got {kind!r}")
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid() if pid is None else pid}")


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0 checks without sending anything).

    Example:
        >>> process_alive(os.getpid())
        True
    """
    if pid <= 0:
        return False  # 0 and negatives name process groups, never one writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user: not ours to judge dead
    return True


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``path`` whose writing process is gone.

    These are what a killed run leaves: ``.NAME.tmp-<pid>`` (a half-written output) and
    ``.NAME.old-<pid>`` (an old output being replaced). Siblings of a live process, this
    one included, are kept: they may be in the middle of being written.

    Returns:
        The paths removed.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / ".out.tmp-999999999").mkdir()
        >>> [p.name for p in remove_stale_siblings(root / "out")]
        ['.out.tmp-999999999']
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{'|'.join(SIBLING_KINDS)})-(\d+)")
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in sorted(entries):
        match = pattern.fullmatch(entry.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        logger.info("removing %s, left by a process that is gone", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


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
    remove_stale_siblings(path)
    tmp = sibling(path)
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
    remove_stale_siblings(path)
    tmp = sibling(path)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def replace_dir(src: Path, out: Path) -> None:
    """Move the complete folder ``src`` to ``out``, replacing what is there.

    The old folder is first renamed aside to ``.OUT.old-<pid>`` (so ``out`` is never
    half old, half new), then removed; if this process dies before that, the next write
    of ``out`` removes it (``remove_stale_siblings``).

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "new").mkdir()
        >>> replace_dir(root / "new", root / "out")
        >>> sorted(p.name for p in root.iterdir())
        ['out']
    """
    old = None
    if out.exists():
        old = sibling(out, "old")
        os.replace(out, old)
    os.replace(src, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only if the block succeeds.

    The folder is the sibling ``.OUT.tmp-<pid>``, made like ``mkdir`` (the umask
    decides its mode, as for every other folder rankcut writes); stale siblings of
    ``out`` left by killed runs are removed first.

    Nested on its own temporary folder (``atomic_dir(tmp)`` inside ``atomic_dir(out)``,
    e.g. ``rankcut.save(model, tmp)``), it writes in place and the outer block commits:
    whatever the outer block adds afterwards (a report) is renamed into place in the
    same step, so a complete ``out`` always has it.

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
    if out in _ACTIVE:
        yield out  # the enclosing atomic_dir owns the rename (and the clean-up on failure)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = sibling(out)
    if tmp in _ACTIVE:
        raise RankcutError(f"{out} is already being written by this process")
    # Our own name can only exist if a dead process had our PID (this process's own
    # temporary folders are removed on failure): it is stale.
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _ACTIVE.add(tmp)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(tmp)
