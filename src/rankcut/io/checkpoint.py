"""Reading safetensors checkpoints: whole, or one group of tensors at a time.

``CheckpointReader`` is the one reader of Hugging Face and rankcut safetensors folders
(``model.safetensors`` or shards listed in ``model.safetensors.index.json``): ``load``
of a rankcut folder reads everything, the streaming pipeline reads one decoder block
at a time into a skeleton built on the meta device (``build_skeleton`` and
``CheckpointLoader``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import RankcutError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def is_safetensors_dir(path: str | os.PathLike) -> bool:
    """A folder holding ``config.json`` and one safetensors file or a sharded index.

    Example:
        >>> is_safetensors_dir("/nonexistent")
        False
    """
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / WEIGHTS_FILE).is_file() or (p / INDEX_FILE).is_file()
    )


#: safetensors header dtype codes -> torch dtype names (as ``rankcut.json`` writes them).
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class CheckpointReader:
    """Reads named tensors from a safetensors checkpoint, one group at a time.

    Opening one validates it without reading any tensor data: every file's header is
    parsed (a truncated or foreign file fails here), and an index must map each tensor
    to an existing shard inside the folder that holds it. Each problem is one
    ``RankcutError`` line. ``shapes`` and ``dtypes`` come from the headers.

    Example:
        >>> reader = CheckpointReader("runs/my-llama")  # doctest: +SKIP
        >>> reader.load(["lm_head.weight"], torch.float32, "cpu")  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        path = self.folder / WEIGHTS_FILE
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        if index.is_file() and not path.is_file():
            self.files = self._read_index(index)
            by_file: dict[Path, set[str]] = {}
            for name, file in self.files.items():
                by_file.setdefault(file, set()).add(name)
            for file, names in by_file.items():
                held = self._read_header(file)
                absent = sorted(names - held)
                if absent:
                    raise RankcutError(
                        f"{index} maps {absent[0]!r} to {file.name}, which does not hold it"
                        + (f" (nor {len(absent) - 1} other tensors)" if len(absent) > 1 else "")
                    )
        elif path.is_file():
            self.files = {name: path for name in self._read_header(path)}
        else:
            raise RankcutError(f"{self.folder} holds no {WEIGHTS_FILE} (nor {INDEX_FILE})")

    def _read_index(self, index: Path) -> dict[str, Path]:
        """``{tensor name: shard path}`` from ``index``, every shard checked to exist."""
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RankcutError(f"cannot read {index}: {err}") from err
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise RankcutError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
        files = {}
        for name, file in weight_map.items():
            # A shard is a plain file of this folder: a path leaving it is refused, not read.
            if not isinstance(file, str) or Path(file).is_absolute() or ".." in Path(file).parts:
                raise RankcutError(f"{index}: invalid shard {file!r} for tensor {name!r}")
            files[name] = self.folder / file
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise RankcutError(
                f"{index} lists shard files missing from {self.folder}: {', '.join(missing[:3])}"
            )
        return files

    def _read_header(self, path: Path) -> set[str]:
        """Tensor names of the safetensors file ``path``; fills ``shapes`` and ``dtypes``."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                for name in names:
                    info = f.get_slice(name)
                    self.shapes[name] = tuple(info.get_shape())
                    self.dtypes[name] = SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype())
        except (OSError, ValueError, SafetensorError) as err:
            raise RankcutError(f"cannot read the safetensors file {path}: {err}") from err
        return names

    def keys(self) -> set[str]:
        return set(self.files)

    def load(self, names: Iterable[str], dtype: torch.dtype | None, device) -> dict[str, Tensor]:
        """``{name: tensor}`` on ``device`` (cast to ``dtype`` unless it is ``None``).

        Files are opened lazily, one at a time.
        """
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in group:
                        # A copy: a tensor still backed by the file's memory map keeps the
                        # whole map's touched pages resident until every tensor read from
                        # it is gone, so releasing one layer would free nothing.
                        out[name] = f.get_tensor(name).to(dtype=dtype, device=device, copy=True)
            except (OSError, SafetensorError) as err:
                raise RankcutError(f"cannot read {path}: {err}") from err
        return out

    def load_all(self, device) -> dict[str, Tensor]:
        """Every tensor of the checkpoint, in its stored dtype."""
        return self.load(sorted(self.files), None, device)

    def fingerprint(self) -> dict:
        """Path, sizes and modification times of the files: a changed model is noticed."""
        files = sorted({*self.files.values(), self.folder / "config.json"})
        return {
            "folder": str(self.folder.resolve()),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        }


def tied_map(model: nn.Module) -> dict[str, str]:
    """``{dropped_name: kept_name}`` for parameters shared under several names."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def swap_parameters(model: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """Replace parameters (by identity) everywhere in ``model``, so ties survive."""
    for sub in model.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and id(p) in new:
                sub._parameters[name] = new[id(p)]


def meta_model(cls, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``cls`` (a transformers model class, or an Auto class) built from ``config`` with
    its parameters on the meta device (nothing allocated, nothing initialized) and real
    buffers, so that non-persistent ones (rotary frequencies) are computed as usual."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "_from_config"):
            return cls._from_config(config, dtype=dtype)
        return cls.from_config(config, dtype=dtype)  # Auto classes


def build_skeleton(folder: str | os.PathLike, device) -> nn.Module:
    """The model of ``folder`` with parameters on meta and real (computed) buffers."""
    from transformers import AutoConfig

    from ..models.sources import first_line, model_class, refuse_remote_code

    refuse_remote_code(folder)  # before transformers reads anything
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise RankcutError(
            f"cannot read {Path(folder) / 'config.json'}: {first_line(err)}"
        ) from err
    model = meta_model(model_class(config), config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # as from_pretrained does: tied heads share the embedding
    for sub in model.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = buf.to(device)
    return model.eval()


def checkpoint_names(model: nn.Module, keys) -> dict[str, str]:
    """``{name in the model: key in the checkpoint}`` for every checkpoint key.

    A checkpoint may store a tensor under another name than the model's parameter:
    transformers renames keys on loading (its per-architecture ``WeightRenaming`` rules,
    e.g. GPT-NeoX's ``embed_out.`` -> ``lm_head.``, and renames them back on saving).
    The same renamings are applied here, so that loading a block at a time reads what
    ``from_pretrained`` would. Conversions that merge or split tensors (``WeightConverter``:
    fused experts) are not renamings; their parameters stay unmatched and the caller
    reports them missing. With a transformers that has no such rules, names are kept.

    Example:
        >>> checkpoint_names(torch.nn.Linear(2, 2), ["weight", "bias"])
        {'weight': 'weight', 'bias': 'bias'}
    """
    keys = list(keys)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # (transformers < 5: checkpoints hold the model's names)
        return {k: k for k in keys}
    try:
        rules = get_model_conversion_mapping(model, add_legacy=False)
    except Exception as err:  # (not a transformers model, or one it cannot map)
        logger.debug("no checkpoint key renamings for %s: %s", type(model).__name__, err)
        rules = []
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    out: dict[str, str] = {}
    for key in keys:
        out.setdefault(apply_renamings(key, renamings) if renamings else key, key)
    return out


class CheckpointLoader:
    """Fills parameters of a meta skeleton from the checkpoint (tied names resolved)."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, device) -> None:
        self.model, self.reader, self.device = model, reader, device
        self.tied = tied_map(model)
        aliases: dict[str, list[str]] = {}
        for dropped, kept in self.tied.items():
            aliases.setdefault(kept, [kept]).append(dropped)
        by_name = checkpoint_names(model, reader.keys())
        self.source: dict[str, str] = {}
        missing = []
        for name, _ in model.named_parameters():
            found = next((by_name[a] for a in aliases.get(name, [name]) if a in by_name), None)
            if found is None:
                missing.append(name)
            self.source[name] = found
        if missing:
            some = ", ".join(sorted(reader.keys())[:5])
            raise RankcutError(
                f"the checkpoint in {reader.folder} lacks tensors the model needs: "
                f"{missing[:5]} (it holds e.g. {some})"
            )

    def load_module(self, module_name: str, recurse: bool = True) -> int:
        """Load a module's parameters into the skeleton; returns the bytes loaded."""
        module = self.model.get_submodule(module_name) if module_name else self.model
        prefix = f"{module_name}." if module_name else ""
        local = {n: p for n, p in module.named_parameters(recurse=recurse)}
        want = {self.source[prefix + n]: n for n in local}
        tensors = self.reader.load(list(want), next(iter(local.values())).dtype, self.device)
        state = {want[k]: v for k, v in tensors.items()}
        swap_parameters(
            self.model,
            {
                id(p): nn.Parameter(state[n], requires_grad=p.requires_grad)
                for n, p in local.items()
            },
        )
        return sum(t.numel() * t.element_size() for t in state.values())
