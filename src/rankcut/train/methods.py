"""Training methods behind ``rankcut train --method``: the complete registry.

The interface (``TrainSetup``, ``TrainMethod``, ``register_train_method``) lives in
``rankcut.train.base``; importing this module also imports every module that registers
a method, so ``TRAIN_METHODS`` and ``train_method`` see them all.

Example:
    >>> sorted(TRAIN_METHODS)[:3]
    ['dense', 'galore', 'lrt']
"""

from __future__ import annotations

from . import galore_method, lowrank_methods  # noqa: F401  (they register their methods)
from .base import TRAIN_METHODS, TrainMethod, TrainSetup, register_train_method, train_method

__all__ = ["TRAIN_METHODS", "TrainMethod", "TrainSetup", "register_train_method", "train_method"]
