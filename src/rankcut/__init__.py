"""rankcut: make transformers smaller and faster by low-rank factorization.

Example:
    >>> import rankcut
    >>> from rankcut.methods import SvdLlmConfig
    >>> model = rankcut.load("smollm2-135m")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "compress": ("rankcut.api", "compress"),
    "CompressionResult": ("rankcut.api", "CompressionResult"),
    "collect_statistics": ("rankcut.api", "collect_statistics"),
    "run": ("rankcut.runner", "run"),
    "CompressRecipe": ("rankcut.recipe", "CompressRecipe"),
    "save": ("rankcut.io", "save"),
    "load": ("rankcut.io", "load"),
    "load_tokenizer": ("rankcut.io", "load_tokenizer"),
    "RankcutError": ("rankcut.errors", "RankcutError"),
    "ConfigError": ("rankcut.errors", "ConfigError"),
    "SvdConfig": ("rankcut.methods", "SvdConfig"),
    "AsvdConfig": ("rankcut.methods", "AsvdConfig"),
    "SvdLlmConfig": ("rankcut.methods", "SvdLlmConfig"),
    "FwsvdConfig": ("rankcut.methods", "FwsvdConfig"),
    "LowRankLinear": ("rankcut.layers", "LowRankLinear"),
    # `rankcut.train` is the subpackage (importing rankcut.train.loop binds that name on
    # the package, so a lazy function of the same name would change under the user):
    # the training verb is exported as `train_model`.
    "train_model": ("rankcut.train.loop", "train"),
    "TrainConfig": ("rankcut.train.loop", "TrainConfig"),
}

_SUBMODULES = {
    "evaluate",
    "methods",
    "layers",
    "decompose",
    "calibrate",
    "rank",
    "models",
    "data",
    "train",
}

__all__ = [*_LAZY, *sorted(_SUBMODULES), "__version__"]


def __getattr__(name: str):
    # Lazy so that `import rankcut` stays cheap (no transformers until needed).
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"rankcut.{name}")
    raise AttributeError(f"module 'rankcut' has no attribute {name!r}")
