"""Rank allocators: ``dict[module_name, rank]`` from shapes, spectra and a global budget."""

from ..decompose.spectrum import decay_exponent
from .allocators import (
    ALLOCATORS,
    AllocationInput,
    AllocatorSpec,
    allocate,
    elbow_index,
    register_allocator,
)
from .budget import budget, cost, max_saving_rank, rank_for_ratio, saves_params, total_cost

__all__ = [
    "ALLOCATORS",
    "AllocationInput",
    "AllocatorSpec",
    "allocate",
    "budget",
    "cost",
    "decay_exponent",
    "elbow_index",
    "max_saving_rank",
    "rank_for_ratio",
    "register_allocator",
    "saves_params",
    "total_cost",
]
