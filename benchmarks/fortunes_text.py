"""Write the Debian ``fortunes`` quotes as one plain-English text file (a non-Shakespeare held-out text).

Usage:
    apt-get install fortunes
    .venv/bin/python benchmarks/fortunes_text.py /tmp/fortunes.txt
"""

import sys
from pathlib import Path

FOLDER = Path("/usr/share/games/fortunes")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fortunes.txt")
    if not FOLDER.is_dir():
        sys.exit("no /usr/share/games/fortunes: apt-get install fortunes")
    parts = []
    for path in sorted(FOLDER.iterdir()):
        # Plain topic files only: skip the index (.dat), UTF-8 copies (.u8) and ASCII art.
        if path.suffix or "art" in path.name or not path.is_file():
            continue
        lines = path.read_text(encoding="latin-1").splitlines()
        parts.append("\n".join(line for line in lines if line.strip() != "%"))
    out.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
