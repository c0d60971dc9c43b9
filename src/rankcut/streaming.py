"""Streaming sequential compression of a safetensors checkpoint bigger than memory.

The model is built on the meta device; the calibration windows run through the
modules before the first decoder block (loaded on first use, then released); then
each block is loaded from the checkpoint files alone, compressed stage by stage on
the cached inputs (the same ``compress_block`` as the in-memory sequential pipeline),
written to its own safetensors shard, and released back to meta while its outputs
feed the next block. The modules after the last block (final norm, LM head) are never
run: their tensors are copied shard by shard at the end.

Resuming: a work folder holds ``state.json`` (which blocks are finished, and a
fingerprint of the inputs) and the activations after the last finished block, all
written atomically (temporary name, then ``os.replace``). Running the same command
again continues after the last finished block; a run whose inputs changed refuses.

Ranks must be known before the first block is loaded, so only allocators that need no
data (``uniform``, plus ``rank_pattern`` overrides) are supported here; methods that
need loss gradients (``fwsvd``) need the whole model and are refused too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calibrate.sequential import BlockInputs, SpilledTensors, capture_block_inputs
from .distributed import Dist, split_windows
from .errors import RankcutError
from .io import INDEX_FILE, META_FILE, WEIGHTS_FILE, build_meta, check_output_dir
from .layers import LAYER_TYPES, dense_weight, factorized_modules
from .methods import MethodConfig, spec_for_config
from .models.structure import replace_module

logger = logging.getLogger(__name__)

STATE_VERSION = 1
#: Set to a block index to stop right after that block is committed (tests, demos).
FAULT_ENV = "RANKCUT_FAULT_AFTER_LAYER"


class InjectedFault(RankcutError):
    """Raised by the ``RANKCUT_FAULT_AFTER_LAYER`` test hook."""


def is_safetensors_dir(path: str | os.PathLike) -> bool:
    """A folder holding ``config.json`` and one safetensors file or a sharded index."""
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / WEIGHTS_FILE).is_file() or (p / INDEX_FILE).is_file()
    )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


class CheckpointReader:
    """Reads named tensors from a safetensors checkpoint, one group at a time."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: self.folder / f for name, f in weight_map.items()}
            else:
                path = self.folder / WEIGHTS_FILE
                with safe_open(str(path), framework="pt") as f:
                    self.files = {name: path for name in f.keys()}
        except (OSError, KeyError, ValueError) as err:
            raise RankcutError(
                f"cannot read the safetensors checkpoint in {folder}: {err}"
            ) from err

    def keys(self) -> set[str]:
        return set(self.files)

    def load(self, names: Iterable[str], dtype: torch.dtype, device) -> dict[str, Tensor]:
        """``{name: tensor}`` cast to ``dtype`` on ``device``; files are opened lazily."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in group:
                    # A copy: a tensor still backed by the file's memory map keeps the
                    # whole map's touched pages resident until every tensor read from
                    # it is gone, so releasing one layer would free nothing.
                    out[name] = f.get_tensor(name).to(dtype=dtype, device=device, copy=True)
        return out

    def fingerprint(self) -> dict:
        """Path, sizes and modification times of the files: a changed model is noticed."""
        files = sorted({*self.files.values(), self.folder / "config.json"})
        return {
            "folder": str(self.folder.resolve()),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        }


class ActivationStore(Sequence):
    """One stream of a block's inputs: hidden states per batch, plus the other arguments.

    Every hidden state is written to ``folder`` (the resume point); it is also kept in
    memory while the stream's total size is at most ``limit_bytes``, else read back
    from the file when needed (the spill). The folder appears under its final name
    only when complete.
    """

    def __init__(self, folder: Path, rest: list[tuple], limit_bytes: int, device) -> None:
        self.folder, self.rest, self.limit, self.device = folder, rest, limit_bytes, device
        self.memory: list[Tensor | None] = []
        self.spilled = False

    @classmethod
    def write(cls, folder, rest, limit_bytes, device, hiddens: Iterable[Tensor]):
        store = cls(folder, rest, limit_bytes, device)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        total = 0
        for i, hidden in enumerate(hiddens):
            _atomic_save({"hidden": hidden.detach().contiguous().cpu()}, tmp / f"{i}.safetensors")
            total += hidden.numel() * hidden.element_size()
            store.memory.append(None if store.spilled else hidden)
            if total > limit_bytes:  # spill: from now on everything is read from disk
                store.spilled = True
                store.memory = [None] * len(store.memory)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return store

    @classmethod
    def open(cls, folder, rest, limit_bytes, device):
        """A stream written by an earlier (interrupted) run."""
        store = cls(folder, rest, limit_bytes, device)
        total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        store.spilled = total > limit_bytes
        store.memory = [None if store.spilled else store._read(i) for i in range(len(rest))]
        return store

    def _read(self, i: int) -> Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.folder / f"{i}.safetensors"), device=str(self.device))["hidden"]

    def __len__(self) -> int:
        return len(self.rest)

    def __getitem__(self, i: int) -> BlockInputs:
        if isinstance(i, slice):
            raise TypeError("ActivationStore does not slice")
        hidden = self.memory[i] if self.memory[i] is not None else self._read(i)
        args, kwargs = self.rest[i]
        return BlockInputs(hidden, args, kwargs)

    def remove(self) -> None:
        self.memory = []
        shutil.rmtree(self.folder, ignore_errors=True)


def _swap(model: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """Replace parameters (by identity) everywhere in ``model``, so ties survive."""
    for sub in model.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and id(p) in new:
                sub._parameters[name] = new[id(p)]


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere): hands freed heap pages back to the OS."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give memory freed by released layers back to the OS.

    Layer tensors of a few to tens of MB are allocated from the C heap; once freed,
    glibc keeps them for reuse and the resident size creeps up layer after layer
    (measured on the 1.3B benchmark: +0.6 GB over 20 streamed layers). Trimming after
    each layer keeps the peak at one layer's working set.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _release(model: nn.Module, module: nn.Module) -> None:
    """``module``'s parameters back to the meta device (buffers stay: small, computed).

    ``module`` may have left ``model`` already (a dense linear replaced by its factors):
    it is released on its own too.
    """
    new = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
        if p.device.type != "meta"
    }
    _swap(model, new)
    _swap(module, new)


def _tied_map(model: nn.Module) -> dict[str, str]:
    """``{dropped_name: kept_name}`` for parameters shared under several names."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def build_skeleton(folder: Path, device) -> nn.Module:
    """The model of ``folder`` with parameters on meta and real (computed) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .models.sources import model_class

    config = AutoConfig.from_pretrained(folder)
    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=torch.float32)
        else:  # Auto classes
            model = cls.from_config(config, dtype=torch.float32)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # as from_pretrained does: tied heads share the embedding
    for sub in model.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = buf.to(device)
    return model.eval()


class _Loader:
    """Fills parameters of the skeleton from the checkpoint (tied names resolved)."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, device) -> None:
        self.model, self.reader, self.device = model, reader, device
        self.tied = _tied_map(model)
        aliases: dict[str, list[str]] = {}
        for dropped, kept in self.tied.items():
            aliases.setdefault(kept, [kept]).append(dropped)
        keys = reader.keys()
        self.source: dict[str, str] = {}
        missing = []
        for name, _ in model.named_parameters():
            found = next((a for a in aliases.get(name, [name]) if a in keys), None)
            if found is None:
                missing.append(name)
            self.source[name] = found
        if missing:
            some = ", ".join(sorted(keys)[:5])
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
        _swap(
            self.model,
            {
                id(p): nn.Parameter(state[n], requires_grad=p.requires_grad)
                for n, p in local.items()
            },
        )
        return sum(t.numel() * t.element_size() for t in state.values())


def _fingerprint(reader, config: MethodConfig, calibration: Tensor, extra: dict) -> dict:
    data = calibration.detach().cpu().contiguous()
    return {
        "model": reader.fingerprint(),
        "method_config": config.to_dict(),
        "calibration": {
            "shape": list(data.shape),
            "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(),
        },
        **extra,
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _shard_plan(model, blocks, tied) -> tuple[list[list[str]], list[list[str]]]:
    """Per-block state-dict names, and the remaining names packed into shards no bigger
    than the largest block (so writing one never holds more than a block's worth)."""
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in tied}
    per_block = [[k for k in state if k.startswith(b + ".")] for b, _ in blocks]
    in_blocks = {k for names in per_block for k in names}
    limit = max(
        sum(state[k].numel() * state[k].element_size() for k in names) for names in per_block
    )
    groups: list[list[str]] = []
    size = 0
    for k in state:
        if k in in_blocks:
            continue
        nbytes = state[k].numel() * state[k].element_size()
        if not groups or size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    return per_block, groups


def _barrier(dist: Dist | None) -> None:
    if dist is not None:
        dist.barrier()


def stream_compress(
    folder: str | os.PathLike,
    config: MethodConfig,
    calibration: Tensor,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    device: str | torch.device = "cpu",
    work_dir: str | os.PathLike | None = None,
    activation_limit_mb: float = 1024,
    overwrite: bool = False,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
    reader: CheckpointReader | None = None,
    progress: bool = True,
    dist: Dist | None = None,
) -> dict | None:
    """Compress the safetensors checkpoint in ``folder`` block by block into ``out``.

    Never holds more than one decoder block's weights (plus, with ``refit``, the dense
    model's activations at the block's stage inputs, spilled to disk like the streams),
    and the modules before the first block while the calibration windows are embedded.
    ``out`` is a rankcut folder with sharded safetensors that ``rankcut.load`` reads.

    Args:
        folder: Hugging Face folder with ``config.json`` and safetensors weights.
        config: method config with ``pipeline="sequential"`` semantics (refit honoured)
            and a data-free allocation (``uniform``).
        calibration: ``(samples, seq_len)`` token ids.
        out: output folder; the partial output and the resume state live in
            ``.OUT.partial`` beside it until the run completes.
        work_dir: where the state and activations go (default ``.OUT.partial/work``).
        activation_limit_mb: streams larger than this are read back from disk.

        dist: the process group (default: the initialized one, if any). Each rank takes
            its share of ``calibration``; rank 0 writes, the others return ``None``.

    Returns:
        The ``rankcut.json`` object written.

    Example:
        >>> from rankcut.methods import SvdLlmConfig
        >>> stream_compress("ckpt/", SvdLlmConfig(ratio=0.2, allocation="uniform"),
        ...                 windows, "runs/ckpt-svdllm")  # doctest: +SKIP
    """
    from . import api
    from .evaluate.params import param_summary
    from .pipelines import advance, check_sequential, compress_block
    from .rank import ALLOCATORS, AllocationInput, allocate

    start = time.perf_counter()
    spec = spec_for_config(config)
    if ALLOCATORS[config.allocation].needs:
        raise RankcutError(
            f"streaming compression needs ranks before it loads the first layer; allocation "
            f"{config.allocation!r} needs whole-model spectra or losses. Use allocation "
            "'uniform' (with rank_pattern overrides), or load the model in memory"
        )
    if "fisher" in spec.needs:
        raise RankcutError(
            f"{spec.name} needs loss gradients through the whole model, which streaming "
            "cannot take; load the model in memory or use another method"
        )
    if calibration is None:
        raise RankcutError("streaming compression needs calibration data")
    folder = Path(folder)
    out = check_output_dir(out, overwrite)
    partial = out.parent / f".{out.name}.partial"
    work = Path(work_dir) / f"rankcut-{out.name}" if work_dir else partial / "work"
    reader = reader or CheckpointReader(folder)
    limit = int(activation_limit_mb * 2**20)

    model = build_skeleton(folder, device)
    loader = _Loader(model, reader, device)
    tied = loader.tied
    before = param_summary(model)
    modules, tied_targets, shapes = api.select_targets(model, config)
    blocks = check_sequential(model, modules)
    inp = AllocationInput(
        shapes=shapes,
        ratio=config.ratio,
        min_rank_fraction=config.min_rank_fraction,
        options=dict(config.allocation_options),
    )
    ranks = allocate(config.allocation, inp) if modules else {}
    kept = api.apply_rank_overrides(config, ranks, shapes, tied_targets)
    todo = {n: m for n, m in modules.items() if n not in kept}
    per_block, rest_groups = _shard_plan(model, blocks, tied)
    n_shards = len(blocks) + len(rest_groups)
    shard_names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]

    # Resume, or start afresh (rank 0 owns the state; each rank has its activations).
    dist = dist or Dist.current()
    main = dist is None or dist.is_main
    world = 1 if dist is None else dist.world
    progress = progress and main
    extra_fp = {"rankcut_state": STATE_VERSION, "processes": world}
    fingerprint = _fingerprint(reader, config, calibration, extra_fp)
    calibration = split_windows(calibration, dist)
    acts = work if main else work / f"rank{dist.rank}"
    state_path = work / "state.json"
    state = {"fingerprint": fingerprint, "done": -1, "layer_seconds": [], "layers": {}}
    if state_path.is_file():
        old = json.loads(state_path.read_text())
        diff = _differences(old.get("fingerprint", {}), fingerprint)
        if diff:
            raise RankcutError(
                f"cannot resume from {work}: the inputs changed ({'; '.join(diff[:4])}). "
                f"Remove {work} (and {partial}) to start afresh"
            )
        state = old
        logger.info("resuming after block %d of %d", state["done"] + 1, len(blocks))
    _barrier(dist)
    if main:
        if state["done"] < 0:
            shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(state_path, json.dumps(state, indent=1))
    _barrier(dist)
    acts.mkdir(parents=True, exist_ok=True)
    done = int(state["done"])

    # Block-0 inputs: the modules before the first block are loaded when called.
    block_names = [b for b, _ in blocks]
    pre_loaded: list[str] = []

    def lazy(name):
        def hook(module, args):
            if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
                loader.load_module(name, recurse=False)
                pre_loaded.append(name)

        return hook

    handles = []
    for name, sub in model.named_modules():
        inside = any(name == b or name.startswith(b + ".") for b in block_names)
        if not inside and any(True for _ in sub.parameters(recurse=False)):
            handles.append(sub.register_forward_pre_hook(lazy(name)))
    try:
        captured = capture_block_inputs(model, blocks[0][1], calibration, 4, device=device)
    finally:
        for h in handles:
            h.remove()
    for name in pre_loaded:
        _release(model, model.get_submodule(name) if name else model)
    return_freed_memory()
    rest = [(b.args, b.kwargs) for b in captured]

    def stream(tag, k, hiddens=None):
        folder_k = acts / f"{tag}-{k}"
        if hiddens is None:
            return ActivationStore.open(folder_k, rest, limit, device)
        return ActivationStore.write(folder_k, rest, limit, device, hiddens)

    if done < 0:
        comp = stream("comp", -1, (b.hidden for b in captured))
        dense = stream("dense", -1, (b.hidden for b in captured)) if config.refit else None
    else:
        for name, structure in state["layers"].items():
            layer_cls = LAYER_TYPES[structure["type"]]
            dtype = dense_weight(model.get_submodule(name)).dtype
            replace_module(model, name, layer_cls.from_structure(structure, "meta", dtype))
        comp = stream("comp", done)
        dense = stream("dense", done) if config.refit else None
    del captured
    fault = os.environ.get(FAULT_ENV)

    bar = tqdm(
        total=len(blocks), initial=done + 1, desc=f"{spec.name} (streaming)", disable=not progress
    )
    for k in range(done + 1, len(blocks)):
        t0 = time.perf_counter()
        block_name, block = blocks[k]
        loader.load_module(block_name)
        api._check_finite_weights(
            {n: model.get_submodule(n) for n in todo if n.startswith(block_name + ".")}
        )
        spill_dir = acts / f"block-{k}"
        dense_out = compress_block(
            model,
            block_name,
            block,
            todo,
            ranks,
            spec,
            config,
            comp,
            dense,
            {},
            dist=dist,
            release=lambda m: (_release(model, m), return_freed_memory()),
            spill=lambda name, d=spill_dir: SpilledTensors(d / name, limit),
        )
        new_comp = stream("comp", k, advance(block, comp))
        new_dense = stream("dense", k, dense_out) if dense_out is not None else None
        del dense_out
        shutil.rmtree(spill_dir, ignore_errors=True)
        _barrier(dist)  # every rank's activations are on disk before the state moves on
        if main:
            tensors = {
                f"{block_name}.{n}": t.detach().contiguous().cpu()
                for n, t in block.state_dict().items()
            }
            _atomic_save(tensors, partial / shard_names[k])
            del tensors
        for name, m in factorized_modules(block):
            state["layers"][f"{block_name}.{name}"] = m.structure()
        _release(model, block)
        for n, m in todo.items():
            if n.startswith(block_name + "."):
                _release(model, m)  # the replaced dense linears (still referenced by todo)
        return_freed_memory()
        state["done"] = k
        state["layer_seconds"].append(round(time.perf_counter() - t0, 3))
        if main:
            _atomic_write_text(state_path, json.dumps(state, indent=1))
        _barrier(dist)
        comp.remove()
        if dense is not None:
            dense.remove()
        comp, dense = new_comp, new_dense
        bar.update(1)
        if fault is not None and int(fault) == k:
            raise InjectedFault(f"fault injected after layer {k} ({FAULT_ENV})")
    bar.close()
    comp.remove()
    if dense is not None:
        dense.remove()
    if not main:
        _barrier(dist)  # rank 0 writes the rest of the output
        return None

    # The modules outside the blocks: copied from the checkpoint, a shard at a time.
    weight_map = {}
    for k, names in enumerate(per_block):
        weight_map.update({n: shard_names[k] for n in names})
    sd = model.state_dict(keep_vars=True)
    for j, names in enumerate(rest_groups):
        params = {n for n, _ in model.named_parameters()}
        tensors = {}
        loaded = reader.load(
            [loader.source[n] for n in names if n in params], sd[names[0]].dtype, "cpu"
        )
        for n in names:
            t = loaded[loader.source[n]] if n in params else sd[n].detach().cpu()
            tensors[n] = t.to(sd[n].dtype).contiguous()
        _atomic_save(tensors, partial / shard_names[len(blocks) + j])
        weight_map.update({n: shard_names[len(blocks) + j] for n in names})
        del tensors, loaded
        return_freed_memory()

    final_ranks = {n: ranks[n] for n in todo}
    params = api.param_report(model, before, shapes, tied_targets, final_ranks)
    model.rankcut_meta = {"method_config": config.to_dict(), "params": params}
    total = sum((partial / s).stat().st_size for s in shard_names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    meta = build_meta(
        model,
        tied,
        {
            "ranks": final_ranks,
            "kept_dense": kept,
            "compression_seconds": round(time.perf_counter() - start, 3),
            "streaming": {
                "layer_seconds": state["layer_seconds"],
                "shards": n_shards,
                "activations_spilled": bool(comp.spilled),
                "processes": world,
            },
            **(extra or {}),
        },
    )
    model.config.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    for name, text in (files or {}).items():
        (partial / name).write_text(text)
    (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (partial / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(partial, out)
    _barrier(dist)
    return meta
