"""Writing a benchmark's results file without losing its hand-written readings."""

from __future__ import annotations

from pathlib import Path

#: Sections from the first heading starting so are written by hand, not by the script.
READING = "\n## Reading"


def write_keeping_readings(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, followed by the readings already in the file (every
    section from the first ``## Reading`` heading on), which a rerun must not drop."""
    old = path.read_text() if path.exists() else ""
    at = old.find(READING)
    path.write_text(text.rstrip("\n") + "\n" + (old[at:] if at >= 0 else ""))
