"""Decoder-block-level calibration: capture a block's inputs, replay blocks on them.

Used by the sequential pipeline: the calibration windows run through the embeddings
once, then each block is replayed on cached hidden states, so only one block's
activations are alive at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import RankcutError
from ..models.adapter import adapter_for
from .hooks import HookManager


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


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    windows: Tensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> list[BlockInputs]:
    """Run the model up to ``block`` for every batch and keep what ``block`` receives."""
    device = device or next(model.parameters()).device
    captured: list[BlockInputs] = []

    def hook(module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        captured.append(BlockInputs(hidden, rest, dict(kwargs)))
        raise StopForward

    adapter = adapter_for(model)
    was_training = model.training
    model.eval()
    with HookManager() as hooks:
        hooks._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        for batch in windows.split(batch_size):
            ids = batch.to(device)
            try:
                model(**adapter.inputs(ids, attention_mask=torch.ones_like(ids), use_cache=False))
            except StopForward:
                continue
            raise RankcutError("the first decoder block was never called")
    model.train(was_training)
    return captured


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
