"""Calibration: hooks that collect sufficient statistics of layer inputs and gradients."""

from .activations import StageInputs
from .collect import (
    collect_fisher,
    collect_input_stats,
    collect_layer_stats,
    input_stats_from_passes,
)
from .hooks import HookManager
from .stats import InputStats, LayerStats

__all__ = [
    "HookManager",
    "InputStats",
    "LayerStats",
    "StageInputs",
    "collect_fisher",
    "collect_input_stats",
    "collect_layer_stats",
    "input_stats_from_passes",
]
