"""Decoder-block-level calibration: capture a block's inputs, replay blocks on them.

Used by the sequential pipeline: the calibration windows run through the embeddings
once, then each block is replayed on cached hidden states, so only one block's
activations are alive at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..errors import RankcutError
from ..models.adapter import adapter_for
from ..models.structure import model_device

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by the capture hook to end the forward pass early."""


@dataclass
class BlockInputs:
    """One batch of a block's inputs: hidden states plus the other call arguments."""

    hidden: Tensor
    args: tuple
    kwargs: dict

    def with_hidden(self, hidden: Tensor) -> BlockInputs:
        return BlockInputs(hidden, self.args, self.kwargs)


class BlockCalls:
    """What each decoder block is called with besides its hidden states, batch by batch.

    Most models call every block with the very same extra arguments (Llama: one mask,
    one pair of rotary tables), and blocks are then replayed on block 0's. Some give
    blocks of different kinds different ones: Gemma 2 and 3 alternate sliding-window
    and full-attention layers, each with its own mask (and, in Gemma 3, its own rotary
    tables). Those blocks keep their own (``other``), read from a pass of the model
    with every block bypassed (``capture_block_calls``), and ``retarget`` gives a
    stream of hidden states the arguments of the block it is about to enter.
    """

    def __init__(self, first: list[tuple[tuple, dict]], other: dict[int, list[tuple[tuple, dict]]]):
        self.first = first
        self.other = other

    @property
    def uniform(self) -> bool:
        """Every block takes block 0's arguments."""
        return not self.other

    def of(self, k: int) -> list[tuple[tuple, dict]]:
        """``(args, kwargs)`` of block ``k``, per batch."""
        return self.other.get(k, self.first)

    def retarget(self, inputs: list[BlockInputs] | None, k: int) -> list[BlockInputs] | None:
        """``inputs`` (hidden states per batch) with block ``k``'s arguments; the same
        list when every block takes the same."""
        if inputs is None or self.uniform:
            return inputs
        calls = self.of(k)
        return [BlockInputs(b.hidden, *c) for b, c in zip(inputs, calls, strict=True)]


@contextlib.contextmanager
def forwards_replaced(replacements: dict[nn.Module, Callable]):
    """Within the context each module answers with its callable instead of its
    ``forward`` (an instance attribute, so its hooks still run); on exit the module's own
    ``forward`` is back, or the instance ``forward`` another wrapper had set (accelerate's
    hooks)."""
    saved = {}
    try:
        for module, forward in replacements.items():
            saved[module] = module.__dict__.get("forward")
            module.forward = forward
        yield
    finally:
        for module, forward in saved.items():
            del module.forward
            if forward is not None:
                module.forward = forward


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and (a.is_meta or bool(torch.equal(a, b)))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # (an object without a usable ==: not known to be the same)
        return False


def _same_call(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    return _same(a[0], b[0]) and _same(a[1], b[1])


def _split_call(args, kwargs) -> tuple[Tensor, tuple, dict]:
    kwargs = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kwargs
    if "hidden_states" not in kwargs:
        raise RankcutError("a decoder block was called without hidden states")
    return kwargs.pop("hidden_states"), (), kwargs


def _meta_call(forward, args, kwargs, hidden: Tensor):
    """What ``forward`` (a block whose weights are on the meta device) returns when called
    on meta copies of its tensor arguments: its structure, computed from shapes alone.
    Tensors beside the hidden states come back as ``None`` (their values are unknown;
    blocks return attention weights there only when asked to). ``hidden`` when the
    block cannot run on meta tensors (the caller then treats it as returning a tensor).
    """

    def meta(value):
        return value.to("meta") if isinstance(value, Tensor) else value

    try:
        out = forward(*tree_map(meta, args), **tree_map(meta, kwargs))
    except Exception as err:  # (a data-dependent op: no structure to learn on meta)
        logger.debug("the first block does not run on meta tensors: %s", err)
        return hidden
    if not isinstance(out, (tuple, list)):
        return hidden
    return (hidden, *(None if isinstance(v, Tensor) else v for v in out[1:]))


@torch.no_grad()
def capture_block_calls(
    model: nn.Module,
    blocks: list[nn.Module],
    windows: Tensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> tuple[list[BlockInputs], BlockCalls]:
    """Block 0's inputs for every batch of ``windows``, and what each of ``blocks`` is
    called with (``BlockCalls``).

    Each batch runs the model with every block bypassed: a block records its call and
    hands its hidden states on unchanged, computing nothing, and the pass stops at the
    last block (no final norm, no head). So the arguments the model makes for each block
    (masks, rotary tables, positions) are the ones a full run gives it, at the cost of
    the embeddings. A bypassed block returns what the first block returns (a tensor, or
    a tuple led by one, with the rest of the first block's tuple), learnt from one real
    call of it when its weights are loaded, else (a streamed skeleton, weights on the
    meta device) from a call on meta copies of its arguments (``_meta_call``).
    """
    if not blocks:
        raise RankcutError("no decoder blocks to capture the inputs of")
    device = device or model_device(model)
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    hiddens: list[Tensor] = []
    # what a block returns beside its hidden states: None (a tensor alone) or the rest of
    # the tuple it returns (DeBERTa unpacks two values), read from the first block's
    style: dict = {}
    last = len(blocks) - 1
    first = blocks[0]
    real_first = first.forward
    loaded = not any(p.is_meta for p in first.parameters())

    def bypass_for(k: int):
        def forward(*args, **kwargs):
            hidden, rest, kw = _split_call(args, kwargs)
            calls[k].append((rest, kw))
            if k == 0:
                hiddens.append(hidden)
                if "rest" not in style:
                    if last == 0:
                        out = hidden  # (the pass stops here: nothing reads the return)
                    elif loaded:
                        out = real_first(*args, **kwargs)
                    else:
                        out = _meta_call(real_first, args, kwargs, hidden)
                    style["rest"] = tuple(out[1:]) if isinstance(out, (tuple, list)) else None
            if k == last:
                raise StopForward
            rest = style.get("rest")
            return hidden if rest is None else (hidden, *rest)

        return forward

    adapter = adapter_for(model)
    was_training = model.training
    model.eval()
    try:
        with forwards_replaced({block: bypass_for(k) for k, block in enumerate(blocks)}):
            for batch in windows.split(batch_size):
                ids = batch.to(device)
                count = len(hiddens)
                inputs = adapter.inputs(ids, attention_mask=torch.ones_like(ids), use_cache=False)
                try:
                    model(**inputs)
                except StopForward:
                    pass
                if len(hiddens) != count + 1:
                    raise RankcutError("the first decoder block was not called once per batch")
    finally:
        model.train(was_training)
    batches = len(hiddens)
    first_calls = calls[0]
    other: dict[int, list[tuple[tuple, dict]]] = {}
    for k in range(1, len(blocks)):
        if len(calls[k]) != batches:
            raise RankcutError(
                f"decoder block {k} was called {len(calls[k])} times in {batches} batches "
                "(once per batch expected)"
            )
        if not all(map(_same_call, calls[k], first_calls)):
            other[k] = calls[k]
    if other:
        logger.info(
            "decoder blocks take different arguments (%d of %d differ from the first's)",
            len(other),
            len(blocks),
        )
    inputs = [BlockInputs(h, *c) for h, c in zip(hiddens, first_calls, strict=True)]
    return inputs, BlockCalls(first_calls, other)


def tensor_version(t: Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place op on its storage), or ``None``
    for a tensor that has none (made under ``torch.inference_mode``).

    A hook that keeps a module's input or output without copying it relies on the block
    not changing that tensor in place later in the same run (Falcon adds its attention
    to the MLP's output with ``+=``); comparing the version before and after the run
    tells."""
    try:
        return t._version
    except RuntimeError:
        return None


def block_output(output) -> Tensor:
    """Hidden states from a block's return value (a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> Tensor:
    return block_output(block(inputs.hidden, *inputs.args, **inputs.kwargs))


@torch.no_grad()
def module_input(run, module: nn.Module) -> Tensor:
    """The input ``module`` receives while ``run()`` executes; the pass stops right there."""
    got: list[Tensor] = []

    def hook(mod, args):
        got.append(args[0].detach())
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise RankcutError(f"{type(module).__name__} was not called by its block")
    return got[0]


class SpilledTensors:
    """An append-only sequence of tensors that moves to files once it outgrows a limit.

    Holds a block's dense-model activations while that block is compressed. Without a
    ``folder`` everything stays in memory; with one, every tensor appended after the
    total passed ``limit_bytes`` is written to ``folder`` and read back when iterated.
    ``clear()`` drops both.
    """

    def __init__(self, folder: str | os.PathLike | None = None, limit_bytes: int = 0) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.limit = limit_bytes
        self.items: list[Tensor | tuple[Path, torch.device]] = []
        self.bytes = 0

    def append(self, tensor: Tensor) -> None:
        tensor = tensor.detach()
        self.bytes += tensor.numel() * tensor.element_size()
        if self.folder is None or self.bytes <= self.limit:
            self.items.append(tensor)
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self.items)}.safetensors"
        save_file({"t": tensor.contiguous().cpu()}, str(path))
        self.items.append((path, tensor.device))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Tensor]:
        from safetensors.torch import load_file

        for item in self.items:
            if isinstance(item, Tensor):
                yield item
            else:
                path, device = item
                yield load_file(str(path), device=str(device))["t"]

    def clear(self) -> None:
        for item in self.items:
            if not isinstance(item, Tensor):
                item[0].unlink(missing_ok=True)
        self.items = []
        self.bytes = 0
