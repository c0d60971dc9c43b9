"""Model sources and structure discovery."""

from .adapter import ModelAdapter, adapter_for, register_adapter, unregister_adapter
from .kind import is_causal_lm
from .sources import BUILTIN_MODELS, cache_dir, gguf_to_hf_dir, hf_location, resolve
from .structure import (
    find_decoder_layers,
    find_targets,
    get_parent,
    model_device,
    replace_module,
    shared_weights,
)

__all__ = [
    "BUILTIN_MODELS",
    "ModelAdapter",
    "adapter_for",
    "cache_dir",
    "find_decoder_layers",
    "find_targets",
    "get_parent",
    "gguf_to_hf_dir",
    "hf_location",
    "is_causal_lm",
    "model_device",
    "register_adapter",
    "replace_module",
    "resolve",
    "shared_weights",
    "unregister_adapter",
]
