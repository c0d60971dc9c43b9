"""Save and load compressed models: safetensors + ``rankcut.json``. Never pickle.

A rankcut output folder holds:

- ``model.safetensors``: the state dict (tied tensors stored once);
- ``config.json``: the base model's transformers config;
- ``rankcut.json``: format version, architecture, method config, per-layer structure
  (type, shape, rank) and parameter counts;
- the tokenizer files, when a tokenizer was given.

Folders are written atomically: everything goes to a temporary sibling folder that is
renamed into place only when complete, so an interrupted save never leaves a folder
that ``load`` accepts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import RankcutError
from ..layers import LAYER_TYPES, factorized_modules
from ..models.sources import hf_location, is_rankcut_dir, load_hf_model
from ..models.structure import replace_module
from .atomic import atomic_dir, check_output_dir
from .checkpoint import WEIGHTS_FILE, CheckpointReader

logger = logging.getLogger(__name__)

FORMAT = "rankcut"
FORMAT_VERSION = 1
META_FILE = "rankcut.json"


def _dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor once, and ``{dropped_name: kept_name}``."""
    state, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state, tied


def save(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Save ``model`` (compressed or not) to the folder ``out``, atomically.

    ``files`` maps extra file names to text written into the folder (e.g. the CLI recipe).

    Example:
        >>> rankcut.save(result.model, "runs/smollm2-svdllm", tokenizer=tok)  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise RankcutError("rankcut.save needs a transformers model (with .config)")
    state, tied = _dedup_state_dict(model)
    meta = build_meta(model, tied, extra)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out)


def build_meta(model: nn.Module, tied: dict[str, str], extra: dict | None = None) -> dict:
    """The ``rankcut.json`` object for ``model`` (its parameters may be on meta)."""
    from .. import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rankcut_version": __version__,
        "architecture": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tied": tied,
        "layers": {name: m.structure() for name, m in factorized_modules(model)},
        **(getattr(model, "rankcut_meta", None) or {}),
        **(extra or {}),
    }


def _load_weights(folder: Path, device) -> dict[str, torch.Tensor]:
    """The whole state dict from ``model.safetensors`` or from the shards of an index."""
    return CheckpointReader(folder).load_all(device)


def read_meta(folder: str | os.PathLike) -> dict:
    """Parse and validate ``rankcut.json``; any problem is a one-line ``RankcutError``."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RankcutError(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RankcutError(f"{path} is not a rankcut metadata file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RankcutError(f"{path}: unsupported format_version {version!r}")
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise RankcutError(f"{path}: 'layers' must be an object")
    for name, spec in layers.items():
        ok = isinstance(spec, dict) and spec.get("type") in LAYER_TYPES
        for key in ("in_features", "out_features", "rank"):
            ok = ok and isinstance(spec.get(key), int) and spec[key] > 0
        if not ok:
            raise RankcutError(f"{path}: invalid layer entry for {name!r}: {spec!r}")
    if not isinstance(meta.get("architecture"), str) or not isinstance(meta.get("tied", {}), dict):
        raise RankcutError(f"{path}: missing or invalid 'architecture'/'tied'")
    return meta


def load_rankcut_dir(folder: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model: skeleton on the meta device, factorized layers, weights."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    folder = Path(folder)
    meta = read_meta(folder)
    cls = getattr(transformers, meta["architecture"], None)
    if cls is None:
        raise RankcutError(f"transformers has no model class {meta['architecture']!r}")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise RankcutError(f"cannot read {folder / 'config.json'}: {err}") from err
    # Parameters on meta (no allocation, no random init); buffers are real so that
    # non-persistent ones (rotary frequencies) are computed as usual.
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=getattr(torch, meta.get("dtype", "float32")))
    for name, spec in meta["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise RankcutError(f"rankcut.json names layer {name!r}, absent from the model") from err
        replace_module(model, name, LAYER_TYPES[spec["type"]].from_structure(spec, device="meta"))
    state = _load_weights(folder, device)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise RankcutError(f"weights do not match rankcut.json: {' '.join(first[:3])}") from err
    if result.unexpected_keys:
        raise RankcutError(f"unexpected tensors in {WEIGHTS_FILE}: {result.unexpected_keys[:5]}")
    for dropped, kept in meta.get("tied", {}).items():
        _alias_parameter(model, dropped, kept)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RankcutError(f"{WEIGHTS_FILE} lacks tensors for: {missing[:5]}")
    model.to(device)
    model.eval()
    model.rankcut_meta = {k: meta[k] for k in ("method_config", "params") if k in meta}
    return model


def _alias_parameter(model: nn.Module, dropped: str, kept: str) -> None:
    mod_name, _, attr = dropped.rpartition(".")
    kmod_name, _, kattr = kept.rpartition(".")
    try:
        target = model.get_submodule(mod_name)
        source = getattr(model.get_submodule(kmod_name), kattr)
    except AttributeError as err:
        raise RankcutError(f"invalid tied entry {dropped!r} -> {kept!r}") from err
    if isinstance(source, nn.Parameter):
        setattr(target, attr, source)
    else:
        target.register_buffer(attr, source)


def load(spec: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model from anything ``--model`` accepts.

    ``spec`` may be a built-in alias (``smollm2-135m``, ``minilm-l6``), a local Hugging
    Face folder, a ``.gguf`` file, a hub id (needs a network) or a rankcut output folder.
    Returns a transformers model, factorized where it was compressed, in eval mode.

    Example:
        >>> model = rankcut.load("runs/smollm2-svdllm")  # doctest: +SKIP
    """
    spec = str(spec)
    kind, location = hf_location(spec)
    if kind == "rankcut":
        return load_rankcut_dir(location, device=device)
    model = load_hf_model(location)
    return model.to(device).eval()


def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer that goes with ``spec`` (same sources as ``load``)."""
    from transformers import AutoTokenizer

    kind, location = hf_location(str(spec))
    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        hint = " (saved without a tokenizer)" if is_rankcut_dir(Path(location)) else ""
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise RankcutError(f"cannot load a tokenizer from {spec!r}{hint}: {first}") from err


def merge_factors(model: nn.Module) -> nn.Module:
    """Replace every factorized layer of ``model`` (in place) by its dense product.

    The result is a plain transformers model: same outputs (up to float rounding of
    ``up @ down``), the dense parameter count, loadable by any tool.
    """
    for name, module in factorized_modules(model):
        replace_module(model, name, module.to_linear())
    model.rankcut_meta = None
    return model


def export_merged(
    model_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``model_dir`` (anything ``load`` accepts) as a plain dense HF checkpoint.

    ``out`` then loads with ``transformers.AutoModelForCausalLM.from_pretrained(out)``
    (or the model's own class), with the tokenizer when one was saved.

    Example:
        >>> rankcut.io.export_merged("runs/smollm2-svdllm", "runs/smollm2-dense")  # doctest: +SKIP
    """
    check_output_dir(out, overwrite)
    model = merge_factors(load(model_dir))
    try:
        tokenizer = load_tokenizer(model_dir)
    except RankcutError:
        tokenizer = None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
