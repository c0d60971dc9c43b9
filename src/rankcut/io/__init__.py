"""Everything rankcut reads and writes: saved folders, checkpoints, atomic outputs.

- ``folder``: ``save`` / ``load`` of rankcut folders (safetensors + ``rankcut.json``),
  tokenizers, merged export. Never pickle.
- ``checkpoint``: the one safetensors checkpoint reader (whole, or a block at a time).
- ``atomic``: temporary siblings renamed into place, for every output.
"""

from .atomic import (
    atomic_dir,
    atomic_save_tensors,
    atomic_write_text,
    check_output_dir,
    check_writable,
    replace_dir,
)
from .checkpoint import (
    INDEX_FILE,
    WEIGHTS_FILE,
    CheckpointLoader,
    CheckpointReader,
    build_skeleton,
    is_safetensors_dir,
    tied_map,
)
from .folder import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    build_meta,
    export_merged,
    hf_location,
    load,
    load_rankcut_dir,
    load_tokenizer,
    merge_factors,
    read_meta,
    save,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "META_FILE",
    "WEIGHTS_FILE",
    "CheckpointLoader",
    "CheckpointReader",
    "atomic_dir",
    "atomic_save_tensors",
    "atomic_write_text",
    "build_meta",
    "build_skeleton",
    "check_output_dir",
    "check_writable",
    "export_merged",
    "hf_location",
    "is_safetensors_dir",
    "load",
    "load_rankcut_dir",
    "load_tokenizer",
    "merge_factors",
    "read_meta",
    "replace_dir",
    "save",
    "tied_map",
]
