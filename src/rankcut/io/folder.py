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

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import RankcutError
from ..layers import LAYER_TYPES, factorized_modules
from ..layers.linear import like_original
from ..models.sources import (
    first_line,
    hf_location,
    is_rankcut_dir,
    load_hf_model,
    refuse_remote_code,
)
from ..models.structure import replace_module
from .atomic import atomic_dir, check_output_dir
from .checkpoint import WEIGHTS_FILE, CheckpointReader, is_safetensors_dir, meta_model

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


def read_meta(folder: str | os.PathLike, check_ranks: bool = True) -> dict:
    """Parse and validate ``rankcut.json``; any problem is a one-line ``RankcutError``.

    Checked here, before any tensor is read: the format and its version, every layer
    entry (a registered type, positive integer sizes and structure fields, a boolean
    bias), ``architecture`` and ``dtype``. A ``ranks`` object, which compress outputs
    store beside ``layers``, must agree with the ranks of ``layers``: ``layers`` is what
    rebuilds the model, so it is the one read (see ``layer_ranks``). ``load`` passes
    ``check_ranks=False`` and checks ``ranks`` once ``layers`` has been checked against
    the tensors, so that a hand-edited layer entry is reported as that.

    Example:
        >>> meta = read_meta("runs/smollm2-svdllm")  # doctest: +SKIP
        >>> layer_ranks(meta)["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
        128
    """
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
        if not _valid_layer_entry(spec):
            raise RankcutError(f"{path}: invalid layer entry for {name!r}: {spec!r}")
    if not isinstance(meta.get("architecture"), str) or not isinstance(meta.get("tied", {}), dict):
        raise RankcutError(f"{path}: missing or invalid 'architecture'/'tied'")
    dtype = meta.get("dtype", "float32")
    if not (isinstance(dtype, str) and _is_float_dtype(getattr(torch, dtype, None))):
        raise RankcutError(
            f"{path}: invalid dtype {dtype!r} (a torch floating-point type such as 'float32')"
        )
    if check_ranks:
        check_stored_ranks(meta, path)
    return meta


def check_stored_ranks(meta: dict, path: str | os.PathLike = META_FILE) -> None:
    """Raise ``RankcutError`` when a stored ``ranks`` object disagrees with ``layers``.

    Example:
        >>> check_stored_ranks({"layers": {"q": {"rank": 8}}, "ranks": {"q": 8}})
    """
    ranks = layer_ranks(meta)
    if "ranks" not in meta or meta["ranks"] == ranks:
        return
    stored = meta["ranks"] if isinstance(meta["ranks"], dict) else {}
    differ = sorted(set(stored) ^ set(ranks) | {n for n in ranks if stored.get(n) != ranks[n]})
    first = differ[0] if differ else "?"
    raise RankcutError(
        f"{path}: 'ranks' disagrees with 'layers' for {len(differ)} matrices (first "
        f"{first!r}: ranks says {stored.get(first)!r}, layers says {ranks.get(first)!r})"
    )


def _is_float_dtype(dtype) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _valid_layer_entry(spec) -> bool:
    """A registered type, positive ``int`` sizes, ``int >= 0`` structure fields (a flag
    such as ``SparseDenseLinear.group`` may be 0), a ``bool`` bias."""
    if not isinstance(spec, dict) or spec.get("type") not in LAYER_TYPES:
        return False

    def whole(v) -> bool:  # bool is an int subclass: true/false is not a size
        return isinstance(v, int) and not isinstance(v, bool)

    sizes = [spec.get(key) for key in ("in_features", "out_features", "rank")]
    fields = [spec.get(key) for key in LAYER_TYPES[spec["type"]].structure_fields]
    ok = all(whole(v) and v > 0 for v in sizes) and all(whole(v) and v >= 0 for v in fields)
    return ok and isinstance(spec.get("bias", False), bool)


def layer_ranks(meta: dict) -> dict[str, int]:
    """``{layer name: rank}`` of a ``rankcut.json`` object, from its ``layers`` entries.

    The one source of ranks: a stored ``ranks`` object repeats them and is only checked
    against this (``read_meta``), never trusted.

    Example:
        >>> layer_ranks({"layers": {"q": {"rank": 8}, "k": {"rank": 4}}})
        {'q': 8, 'k': 4}
    """
    return {name: spec["rank"] for name, spec in meta["layers"].items()}


def _model_class(meta: dict, config) -> type:
    """The transformers class ``rankcut.json`` names, checked to be one that fits ``config``."""
    import transformers

    name = meta["architecture"]
    try:
        cls = getattr(transformers, name, None)
    except (ImportError, RuntimeError):  # a lazy attribute whose backend is missing
        cls = None
    if cls is None:
        raise RankcutError(f"rankcut.json: transformers has no model class {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise RankcutError(f"rankcut.json: architecture {name!r} is not a transformers model class")
    wanted = getattr(cls, "config_class", None)
    if wanted is not None and not isinstance(config, wanted):
        raise RankcutError(
            f"rankcut.json: architecture {name!r} does not fit config.json "
            f"(model_type {getattr(config, 'model_type', None)!r}, {type(config).__name__})"
        )
    return cls


def _check_tensors(model: nn.Module, meta: dict, reader: CheckpointReader) -> None:
    """Names, shapes and dtype of the stored tensors against the rebuilt skeleton.

    Run before any tensor data is read, so that a hand-edited ``rankcut.json`` (or
    ``config.json``) is one line naming the entry, not a torch size-mismatch traceback.
    """
    tied = meta.get("tied", {})
    files = set(reader.files.values())
    where = next(iter(files)).name if len(files) == 1 else "the checkpoint's shards"
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in tied}
    unexpected = sorted(set(reader.shapes) - set(expected))
    if unexpected:
        raise RankcutError(f"unexpected tensors in {where}: {unexpected[:5]}")
    params = {n for n, _ in model.named_parameters()} - set(tied)
    missing = sorted(params - set(reader.shapes))
    if missing:
        raise RankcutError(f"{where} lacks tensors for: {missing[:5]}")
    layers = meta["layers"]
    for name, shape in expected.items():
        stored = reader.shapes.get(name)
        if stored is None or stored == shape:
            continue
        owner = next((lay for lay in layers if name.startswith(f"{lay}.")), None)
        if owner is not None:
            spec = layers[owner]
            raise RankcutError(
                f"rankcut.json and {where} do not match: layer {owner!r} ({spec['type']}, "
                f"{spec['in_features']} -> {spec['out_features']}, rank {spec['rank']}) needs "
                f"{name!r} of shape {list(shape)}, stored {list(stored)}"
            )
        raise RankcutError(
            f"config.json and {where} do not match: {name!r} needs shape {list(shape)}, "
            f"stored {list(stored)}"
        )
    # rankcut.json's dtype is the first parameter's (build_meta): check that very tensor.
    first = next((n for n, _ in model.named_parameters() if n in reader.dtypes), None)
    dtype = meta.get("dtype", "float32")
    if first is not None and reader.dtypes[first] != dtype:
        raise RankcutError(
            f"rankcut.json says dtype {dtype!r} but {where} stores {reader.dtypes[first]!r} "
            f"(e.g. {first!r})"
        )


def load_rankcut_dir(folder: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model: skeleton on the meta device, factorized layers, weights.

    Everything is checked before a tensor is read: no code from the folder (``auto_map``),
    ``rankcut.json`` (``read_meta``), its architecture against ``config.json``, and the
    stored tensors' names, shapes and dtype against the rebuilt skeleton.

    Example:
        >>> model = load_rankcut_dir("runs/smollm2-svdllm")  # doctest: +SKIP
    """
    from transformers import AutoConfig

    folder = Path(folder)
    refuse_remote_code(folder)  # before transformers reads anything
    meta = read_meta(folder, check_ranks=False)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise RankcutError(f"cannot read {folder / 'config.json'}: {first_line(err)}") from err
    cls = _model_class(meta, config)
    reader = CheckpointReader(folder)
    model = meta_model(cls, config, getattr(torch, meta.get("dtype", "float32")))
    for name, spec in meta["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise RankcutError(f"rankcut.json names layer {name!r}, absent from the model") from err
        try:
            layer = LAYER_TYPES[spec["type"]].from_structure(spec, device="meta")
        except (KeyError, TypeError, ValueError) as err:
            raise RankcutError(f"rankcut.json: cannot rebuild layer {name!r}: {err}") from err
        replace_module(model, name, layer)
    _check_tensors(model, meta, reader)
    # layers now agree with the tensors; a repeated ``ranks`` must agree with layers.
    check_stored_ranks(meta, folder / META_FILE)
    state = reader.load_all(device)
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
    if is_safetensors_dir(location):
        CheckpointReader(location)  # a truncated file or a bad index: one line, not a traceback
    model = load_hf_model(location)
    return model.to(device).eval()


def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer that goes with ``spec`` (same sources as ``load``).

    A folder whose ``config.json`` or ``tokenizer_config.json`` has an ``auto_map`` is
    refused (``RankcutError``): custom tokenizer classes are code.

    Example:
        >>> tokenizer = rankcut.load_tokenizer("runs/smollm2-svdllm")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    kind, location = hf_location(str(spec))  # refuses folders with an auto_map
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except (OSError, ValueError) as err:
        hint = " (saved without a tokenizer)" if is_rankcut_dir(Path(location)) else ""
        raise RankcutError(
            f"cannot load a tokenizer from {spec!r}{hint}: {first_line(err)}"
        ) from err


def merge_factors(model: nn.Module) -> nn.Module:
    """Replace every factorized layer of ``model`` (in place) by its dense product.

    The result is a plain transformers model: same outputs (up to float rounding of
    ``up @ down``), the dense parameter count, loadable by any tool. Each product takes
    the layout the model class builds at its place (GPT-2's ``Conv1D`` stores ``(in,
    out)``), read from a meta-device copy of the architecture.
    """
    factorized = list(factorized_modules(model))
    originals = _original_modules(model, [name for name, _ in factorized])
    for name, module in factorized:
        replace_module(model, name, like_original(module.to_linear(), originals.get(name)))
    model.rankcut_meta = None
    return model


def _original_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The modules the model's class builds at ``names`` (on the meta device, nothing
    allocated); empty for a model that is no transformers model."""
    config = getattr(model, "config", None)
    if not names or config is None or not hasattr(type(model), "_from_config"):
        return {}
    try:
        skeleton = meta_model(type(model), config)
    except Exception as err:  # (an architecture that cannot be rebuilt from its config)
        logger.debug("no skeleton of %s to merge into: %s", type(model).__name__, err)
        return {}
    found = {}
    for name in names:
        with contextlib.suppress(AttributeError):
            found[name] = skeleton.get_submodule(name)
    return found


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
