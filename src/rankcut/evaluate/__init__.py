"""Evaluation: perplexity and parameter counts."""

from .params import count_params, param_summary
from .perplexity import perplexity, perplexity_of_windows

__all__ = ["count_params", "param_summary", "perplexity", "perplexity_of_windows"]
