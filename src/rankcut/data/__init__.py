"""Text sources and token windows."""

from .corpora import BUILTIN_CORPORA, HELDOUT_WORKS, load_text, shakespeare_files
from .windows import bos_prefix, calibration_windows, evaluation_windows, tokenize

__all__ = [
    "BUILTIN_CORPORA",
    "HELDOUT_WORKS",
    "bos_prefix",
    "calibration_windows",
    "evaluation_windows",
    "load_text",
    "shakespeare_files",
    "tokenize",
]
