"""rankcut's cache folder, one definition for the library and the torch-free executable.

Example:
    >>> cache_dir({"RANKCUT_CACHE": "/tmp/rc"}).as_posix()
    '/tmp/rc'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$RANKCUT_CACHE``, default ``~/.cache/rankcut`` (GGUF conversions, calibration
    windows, the MKL shim)."""
    return Path(environ.get("RANKCUT_CACHE", Path.home() / ".cache" / "rankcut"))
