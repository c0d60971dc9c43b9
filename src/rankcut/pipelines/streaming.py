"""The streaming pipeline: sequential compression of a checkpoint bigger than memory.

Its entry point is ``rankcut.streaming.stream_compress`` (it builds the skeleton and the
plan, ``plan.make_plan(..., pipeline="streaming")``, then calls ``run_streaming``).

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
again continues after the last finished block; a run whose inputs changed refuses,
unless ``overwrite`` is set: then the stale partial output is discarded and the run
starts afresh. The partial folder is the resume point, so a failed run keeps it; the
report is written into it before the final rename, so a complete output has its report.

Ranks must be known before the first block is loaded, so only allocators that need no
data (``uniform``, plus ``rank_pattern`` overrides) are supported here; methods that
need loss gradients (``fwsvd``) need the whole model and are refused too.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibrate.sequential import BlockInputs, SpilledTensors, capture_block_calls
from ..distributed import Dist, split_windows
from ..errors import RankcutError
from ..io import (
    INDEX_FILE,
    META_FILE,
    CheckpointLoader,
    CheckpointReader,
    atomic_save_tensors,
    atomic_write_text,
    build_meta,
    replace_dir,
)
from ..io.atomic import remove_stale_siblings
from ..io.checkpoint import swap_parameters
from ..layers import LAYER_TYPES, dense_weight, factorized_modules
from ..models.structure import replace_module
from .plan import check_finite_weights
from .registry import register_pipeline

if TYPE_CHECKING:
    from ..methods import MethodConfig

logger = logging.getLogger(__name__)

STATE_VERSION = 1
#: Set to a block index to stop right after that block is committed (tests, demos).
FAULT_ENV = "RANKCUT_FAULT_AFTER_LAYER"


class InjectedFault(RankcutError):
    """Raised by the ``RANKCUT_FAULT_AFTER_LAYER`` test hook."""


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
            atomic_save_tensors(
                {"hidden": hidden.detach().contiguous().cpu()}, tmp / f"{i}.safetensors"
            )
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


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere): hands freed heap pages back to the OS."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory(collect: bool = True) -> None:
    """Give memory freed by released layers back to the OS.

    Layer tensors of a few to tens of MB are allocated from the C heap; once freed,
    glibc keeps them for reuse and the resident size creeps up layer after layer
    (measured on the 1.3B benchmark: +0.6 GB over 20 streamed layers). Trimming after
    each layer keeps the peak at one layer's working set.

    ``collect`` first runs Python's cycle collector, for tensors only a reference cycle
    still holds; it walks every object of the process (0.1-0.3 s in a large one), so
    it runs once per block, not after each of the block's matrices (whose tensors
    reference counting frees).
    """
    if collect:
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
    swap_parameters(model, new)
    swap_parameters(module, new)


def _tensor_fingerprint(tensor: Tensor) -> dict:
    data = tensor.detach().cpu().contiguous()
    return {"shape": list(data.shape), "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()}


def _fingerprint(reader, config: MethodConfig, calibration: Tensor, extra: dict) -> dict:
    return {
        "model": reader.fingerprint(),
        "method_config": config.to_dict(),
        "calibration": _tensor_fingerprint(calibration),
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


def _shard_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _barrier(dist: Dist | None) -> None:
    if dist is not None:
        dist.barrier()


@contextlib.contextmanager
def _outside_blocks_loaded(model: nn.Module, loader: CheckpointLoader, block_names: list[str]):
    """Modules outside the blocks (embeddings, final norm, head) load when first called
    inside the ``with``, and are released at its end."""
    loaded: list[str] = []

    def lazy(name):
        def hook(module, args):
            if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
                loader.load_module(name, recurse=False)
                loaded.append(name)

        return hook

    handles = []
    for name, sub in model.named_modules():
        inside = any(name == b or name.startswith(b + ".") for b in block_names)
        if not inside and any(True for _ in sub.parameters(recurse=False)):
            handles.append(sub.register_forward_pre_hook(lazy(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for name in loaded:
            _release(model, model.get_submodule(name) if name else model)
        return_freed_memory()


@torch.no_grad()
def _eval_outputs(block: nn.Module, store: ActivationStore, state: dict) -> Iterable[Tensor]:
    """The dense ``block``'s outputs on the evaluation stream (recording whether blocks
    return tuples, which the final head pass needs)."""
    from ..calibrate.sequential import block_output
    from ..evaluate.streamed import returns_tuple

    for b in store:
        out = block(b.hidden, *b.args, **b.kwargs)
        state["block_returns_tuple"] = returns_tuple(out)
        yield block_output(out)


def _held_out_perplexity(model, loader, blocks, job, evald, evalc, state, device) -> dict:
    """Dense and compressed perplexity of the evaluation windows from their final hidden
    states (the head and final norm are loaded for this and released again)."""
    from ..evaluate.streamed import perplexity_after_blocks

    result = {"data": job.eval_data, "seq_len": int(job.eval_windows.shape[1])}
    with _outside_blocks_loaded(model, loader, [b for b, _ in blocks]):
        for label, store in (("dense", evald), ("compressed", evalc)):
            result[label], _ = perplexity_after_blocks(
                model,
                [b for _, b in blocks],
                job.eval_windows,
                [s.hidden for s in store],
                4,
                job.eval_prefix,
                bool(state.get("block_returns_tuple", False)),
                device,
            )
    return result


@dataclass
class StreamJob:
    """Where the streaming pipeline reads from and writes to (besides the plan).

    Attributes:
        reader: the checkpoint the skeleton's parameters are read from.
        loader: fills the skeleton's parameters from ``reader``.
        out: the output folder (checked writable by the entry point).
        work_dir: where the state and activations go (default ``.OUT.partial/work``).
        activation_limit_mb: streams larger than this are read back from disk.
        tokenizer: saved with the output when given.
        device: where blocks are loaded and computed.
        extra: more ``rankcut.json`` entries; ``files``: more text files for the output.
        dist: the process group, or ``None`` for one process.
        start: ``time.perf_counter()`` when the entry point started.
        overwrite: a partial output whose inputs differ is discarded (else: refused).
        report: write ``report.md`` / ``report.html`` / ``ranks.png`` into the output.
        eval_windows: ``(n, L)`` held-out token windows: their perplexity before and after
            compression is measured on the way (the windows travel through each block
            beside the calibration data) and written to ``rankcut.json`` and the report.
        eval_prefix: positions of each evaluation window that are context only (a BOS).
        eval_data: what the evaluation text was (recorded with the perplexities).
    """

    reader: CheckpointReader
    loader: CheckpointLoader
    out: Path
    work_dir: Path | None = None
    activation_limit_mb: float = 1024
    tokenizer: object = None
    device: str | torch.device = "cpu"
    extra: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    dist: Dist | None = None
    start: float = field(default_factory=time.perf_counter)
    overwrite: bool = False
    report: bool = True
    eval_windows: Tensor | None = None
    eval_prefix: int = 0
    eval_data: str | None = None


@register_pipeline(
    "streaming",
    in_memory=False,
    selectable=False,
    summary="sequential, one block read from disk at a time (rankcut.streaming)",
)
def run_streaming(model, plan, calibration, *, progress=True, job: StreamJob) -> dict | None:
    """Execute ``plan`` on the meta ``model`` block by block, writing ``job.out``.

    Returns the ``rankcut.json`` object written (``None`` on ranks other than 0).
    """
    from .sequential import BlockFacts, advance, check_sequential, compress_block

    config, spec, todo = plan.config, plan.spec, plan.todo
    planned = (todo, plan.ranks, spec, config)  # what compress_block takes of the plan
    out, device, dist, loader = job.out, job.device, job.dist, job.loader
    reader = job.reader
    partial = out.parent / f".{out.name}.partial"
    work = Path(job.work_dir) / f"rankcut-{out.name}" if job.work_dir else partial / "work"
    limit = int(job.activation_limit_mb * 2**20)
    tied = loader.tied
    blocks = check_sequential(model, plan.modules)
    _, rest_groups = _shard_plan(model, blocks, tied)
    n_shards = len(blocks) + len(rest_groups)
    shard_names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]

    # Resume, or start afresh (rank 0 owns the state; each rank has its activations).
    main = dist is None or dist.is_main
    world = 1 if dist is None else dist.world
    progress = progress and main
    extra_fp = {"rankcut_state": STATE_VERSION, "processes": world}
    evaluating = job.eval_windows is not None
    if evaluating:
        extra_fp["evaluation"] = _tensor_fingerprint(job.eval_windows)
    fingerprint = _fingerprint(reader, config, calibration, extra_fp)
    calibration = split_windows(calibration, dist)
    acts = work if main else work / f"rank{dist.rank}"
    state_path = work / "state.json"
    state = {"fingerprint": fingerprint, "done": -1, "layer_seconds": [], "layers": {}}
    if state_path.is_file():
        old = json.loads(state_path.read_text())
        diff = _differences(old.get("fingerprint", {}), fingerprint)
        if diff and not job.overwrite:
            raise RankcutError(
                f"cannot resume from {work}: the inputs changed ({'; '.join(diff[:4])}). "
                f"Remove {work} (and {partial}) or use --overwrite to start afresh"
            )
        if diff:
            logger.warning("discarding %s: its inputs differ (%s)", partial, "; ".join(diff[:4]))
        else:
            state = old
            logger.info("resuming after block %d of %d", state["done"] + 1, len(blocks))
    _barrier(dist)
    if main:
        # What killed runs left beside the output (never a live run's, never .partial).
        remove_stale_siblings(out)
        if state["done"] < 0:  # a fresh start: nothing stale may end up in the output
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_path, json.dumps(state, indent=1))
    _barrier(dist)
    acts.mkdir(parents=True, exist_ok=True)
    done = int(state["done"])

    # Block-0 inputs: the modules before the first block are loaded when called.
    block_names = [b for b, _ in blocks]
    evaluating = evaluating and main  # rank 0 alone measures the perplexities
    modules = [b for _, b in blocks]
    with _outside_blocks_loaded(model, loader, block_names):
        captured, calls = capture_block_calls(model, modules, calibration, 4, device=device)
        held, held_calls = (
            capture_block_calls(model, modules, job.eval_windows, 4, device=device)
            if evaluating
            else ([], None)
        )

    def stream(tag, k, hiddens=None):
        """The store of block ``k``'s outputs (``k = -1``: block 0's inputs), which
        carries what block ``k + 1`` is called with besides them."""
        folder_k = acts / f"{tag}-{k}"
        extra_args = (held_calls if tag.startswith("eval") else calls).of(k + 1)
        if hiddens is None:
            return ActivationStore.open(folder_k, extra_args, limit, device)
        return ActivationStore.write(folder_k, extra_args, limit, device, hiddens)

    evald = evalc = None
    if done < 0:
        comp = stream("comp", -1, (b.hidden for b in captured))
        dense = stream("dense", -1, (b.hidden for b in captured)) if config.refit else None
        if evaluating:
            evald = stream("evald", -1, (b.hidden for b in held))
            evalc = stream("evalc", -1, (b.hidden for b in held))
    else:
        for name, structure in state["layers"].items():
            layer_cls = LAYER_TYPES[structure["type"]]
            dtype = dense_weight(model.get_submodule(name)).dtype
            replace_module(model, name, layer_cls.from_structure(structure, "meta", dtype))
        comp = stream("comp", done)
        dense = stream("dense", done) if config.refit else None
        if evaluating:
            evald, evalc = stream("evald", done), stream("evalc", done)
    del captured, held
    # Time spent by earlier processes of a resumed run (up to their last finished block).
    elapsed_before = float(state.get("elapsed_seconds", 0.0))
    fault = os.environ.get(FAULT_ENV)

    bar = tqdm(
        total=len(blocks), initial=done + 1, desc=f"{spec.name} (streaming)", disable=not progress
    )
    facts = BlockFacts()  # (a resumed run tests the first block of a class again)
    for k in range(done + 1, len(blocks)):
        t0 = time.perf_counter()
        block_name, block = blocks[k]
        loader.load_module(block_name)
        check_finite_weights(
            {n: model.get_submodule(n) for n in todo if n.startswith(block_name + ".")}
        )
        spill_dir = acts / f"block-{k}"
        new_evald = stream("evald", k, _eval_outputs(block, evald, state)) if evaluating else None
        dense_out, comp_out = compress_block(
            model,
            block_name,
            block,
            *planned,
            comp,
            dense,
            {},
            dist=dist,
            release=lambda m: (_release(model, m), return_freed_memory(collect=False)),
            spill=lambda name, d=spill_dir: SpilledTensors(d / name, limit),
            replay=False,  # (its outputs would sit in memory beside the spilled stream)
            facts=facts,
        )
        new_comp = stream("comp", k, comp_out if comp_out is not None else advance(block, comp))
        new_dense = stream("dense", k, dense_out) if dense_out is not None else None
        new_evalc = stream("evalc", k, advance(block, evalc)) if evaluating else None
        del dense_out, comp_out
        shutil.rmtree(spill_dir, ignore_errors=True)
        _barrier(dist)  # every rank's activations are on disk before the state moves on
        if main:
            tensors = {
                f"{block_name}.{n}": t.detach().contiguous().cpu()
                for n, t in block.state_dict().items()
            }
            atomic_save_tensors(tensors, partial / shard_names[k])
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
        state["elapsed_seconds"] = round(elapsed_before + time.perf_counter() - job.start, 3)
        if main:
            atomic_write_text(state_path, json.dumps(state, indent=1))
        _barrier(dist)
        for old in (comp, dense, evald, evalc):
            if old is not None:
                old.remove()
        comp, dense, evald, evalc = new_comp, new_dense, new_evald, new_evalc
        bar.update(1)
        if fault is not None and int(fault) == k:
            raise InjectedFault(f"fault injected after layer {k} ({FAULT_ENV})")
    bar.close()
    perplexity = None
    if evaluating:
        perplexity = _held_out_perplexity(model, loader, blocks, job, evald, evalc, state, device)
    for old in (comp, dense, evald, evalc):
        if old is not None:
            old.remove()
    if not main:
        _barrier(dist)  # rank 0 writes the rest of the output
        return None

    # The modules outside the blocks: copied from the checkpoint, a shard at a time.
    # The block shards hold the factorized layers' tensors, not the dense names the
    # plan started from: the index lists what each shard really holds (its header).
    weight_map = {}
    for k in range(len(blocks)):
        weight_map.update({n: shard_names[k] for n in _shard_keys(partial / shard_names[k])})
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
        atomic_save_tensors(tensors, partial / shard_names[len(blocks) + j])
        weight_map.update({n: shard_names[len(blocks) + j] for n in names})
        del tensors, loaded
        return_freed_memory()

    params = plan.param_report(model)
    model.rankcut_meta = {"method_config": config.to_dict(), "params": params}
    total = sum((partial / s).stat().st_size for s in shard_names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    meta = build_meta(
        model,
        tied,
        {
            "ranks": plan.final_ranks,
            "kept_dense": plan.kept,
            # Every process of a resumed run counts (not the work a kill made it redo).
            "compression_seconds": round(elapsed_before + time.perf_counter() - job.start, 3),
            "streaming": {
                "layer_seconds": state["layer_seconds"],
                "shards": n_shards,
                "activations_spilled": bool(comp.spilled),
                "processes": world,
            },
            **job.extra,
            **({"perplexity": perplexity} if perplexity is not None else {}),
        },
    )
    model.config.save_pretrained(partial)
    if job.tokenizer is not None:
        job.tokenizer.save_pretrained(partial)
    for name, text in job.files.items():
        (partial / name).write_text(text)
    (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (partial / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    if job.report:
        from ..report import write_report

        # Inside the partial folder: the rename below publishes the report with the rest.
        write_report(partial, name=out.name)
    replace_dir(partial, out)
    _barrier(dist)
    return meta
