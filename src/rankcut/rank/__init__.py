"""Rank allocators: ``dict[module_name, rank]`` from shapes and a budget."""

from .uniform import ALLOCATORS, allocate, rank_for_ratio, register_allocator, saves_params

__all__ = ["ALLOCATORS", "allocate", "rank_for_ratio", "register_allocator", "saves_params"]
