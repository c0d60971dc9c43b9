"""The targets' inputs kept from a whole-model pass, for the sequential pipeline's
dense stream.

With ``refit`` the sequential pipeline needs, block by block, the inputs the *dense*
model gives each stage (q/k/v, o, gate/up, down), and used to rerun every dense block
to get them. The allocation's statistics pass has already run the dense model over the
very same windows: ``StageInputs`` keeps what the targets received there, one tensor per
distinct input (modules sharing an input share it), so no dense block runs again.

This costs memory: every stage input of every block at once (float32 SmolLM2-135M at
32 x 512 tokens: 4.5 GB at the end of the pass), freed block by block as the pipeline
goes. It is kept
only while the whole would take at most ``MEMORY_FRACTION`` of the memory free on the
device when the pass starts; otherwise it is dropped (after the first batch, from the
projected size) and the pipeline reruns the dense blocks as before. The values are the
ones a dense block run gives (the same computation on the same inputs).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..errors import RankcutError
from .sequential import tensor_version

logger = logging.getLogger(__name__)

#: Most of the device's free memory (when the pass starts) the kept inputs may take.
MEMORY_FRACTION = 0.5


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device`` (host RAM for anything but CUDA)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


class StageInputs:
    """Inputs of the targets during one whole-model pass, per distinct input tensor.

    ``record(module, name, owner, x, y)`` is called for every target call (``owner``: the
    first module that received the same tensor ``x``; ``y`` its output). Each stage
    (the modules sharing one input) is kept in the smaller of two forms, flattened to
    ``(tokens, width)``: the shared input, or, when the stage's outputs are narrower
    than its input (``down_proj``) and its modules have no bias, each module's output
    ``x W^T``, which is all the refit reads of the dense input there (its cross
    products ``X'^T X W^T``; float32 outputs only, so that the values are the ones the
    refit would compute). The form is decided once the first batch has been seen
    (``end_batch``), and so is whether the projected total fits in the budget.

    Args:
        tokens: tokens the pass will run (windows times length): the projection of the
            total size.
        budget: bytes the inputs may take (default: ``MEMORY_FRACTION`` of the free
            memory on the device of the first input).
    """

    def __init__(self, tokens: int, budget: int | None = None) -> None:
        self.tokens = int(tokens)
        self.budget = budget
        self.parts: dict[tuple[str, str], list[Tensor]] = {}  # ("in", owner) / ("out", name)
        self.row_bytes: dict[tuple[str, str], int] = {}
        self.order: list[str] = []  # every target, in the order of its first call
        self.owner_of: dict[str, str] = {}
        self.outputs: set[str] = set()  # owners whose stage is kept as outputs
        self.decided = False
        self.active = True
        self.unchecked: list[tuple[Tensor, int | None]] = []  # this batch's inputs, versions

    @property
    def expected_bytes(self) -> int:
        return sum(self.row_bytes.values()) * self.tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.parts.values() for t in parts)

    def _keep(self, key: tuple[str, str], t: Tensor) -> None:
        t = t.reshape(-1, t.shape[-1])
        self.row_bytes.setdefault(key, t.shape[-1] * t.element_size())
        self.parts.setdefault(key, []).append(t)

    def record(self, module, name: str, owner: str, x: Tensor, y: Tensor) -> None:
        if name not in self.owner_of:
            self.order.append(name)
            self.owner_of[name] = owner
        if not self.active:
            return
        if self.budget is None:
            self.budget = int(MEMORY_FRACTION * free_bytes(x.device))
        first = not self.decided
        if name == owner and (first or owner not in self.outputs):
            self._keep(("in", owner), x.detach())  # (checked unchanged at the batch's end)
            self.unchecked.append((x, tensor_version(x)))
        # Outputs only of a module without bias: subtracting a bias from ``x W^T + b``
        # would cancel digits where ``|b|`` dominates (measured on a tiny GPT-2 with
        # biases of 0.1: factors off by 5e-6 against 1e-7 with the inputs kept).
        narrow = (
            y.dtype in (torch.float32, torch.float64)
            and y.shape[-1] < x.shape[-1]
            and getattr(module, "bias", None) is None
        )
        if (first and narrow) or owner in self.outputs:
            # a copy: the block may change its output in place (``out *= scale``)
            self._keep(("out", name), y.detach().clone())

    def end_batch(self) -> None:
        """After each batch: whether the model left the kept inputs as they were (a
        block that changes a target's input in place after the call would leave other
        values than the target read: nothing is kept then); after the first, each
        stage's form and whether the total fits."""
        changed = any(tensor_version(x) != v for x, v in self.unchecked)
        self.unchecked.clear()
        if changed:
            self.drop("the model changed a target's input in place after the target read it")
        if self.decided or not self.active or not self.parts:
            return
        self.decided = True
        for owner, names in self._stages(self.order).items():
            outs = [("out", n) for n in names]
            if all(k in self.row_bytes for k in outs):
                width = sum(self.row_bytes[k] for k in outs)
                if width < self.row_bytes[("in", owner)]:
                    self.outputs.add(owner)
        for key in list(self.parts):
            kind, name = key
            if (kind == "in") == (self.owner_of[name] in self.outputs):
                del self.parts[key], self.row_bytes[key]
        if self.expected_bytes > self.budget:
            self.drop(
                f"they would take {self.expected_bytes / 2**30:.2f} GiB, more than "
                f"{self.budget / 2**30:.2f} GiB ({MEMORY_FRACTION:.0%} of the free memory)"
            )

    def _stages(self, names) -> dict[str, list[str]]:
        """``names`` grouped by the owner of their shared input, in call order."""
        wanted = set(names)
        groups: dict[str, list[str]] = {}
        for name in self.order:
            if name in wanted:
                groups.setdefault(self.owner_of[name], []).append(name)
        return groups

    def covers(self, names) -> bool:
        """Whether the pass kept the inputs of every one of ``names``."""
        return self.active and self.decided and all(n in self.owner_of for n in names)

    def retain(self, names) -> None:
        """Release what no one of ``names`` reads (the stages of matrices kept dense)."""
        names = set(names)
        needed = {self.owner_of[n] for n in names if n in self.owner_of}
        for key in list(self.parts):
            kind, name = key
            if (kind == "in" and name not in needed) or (kind == "out" and name not in names):
                del self.parts[key]

    def drop(self, reason: str) -> None:
        """Keep nothing more (the pipeline reruns the dense blocks instead)."""
        if self.active:
            logger.info("not keeping the dense stage inputs of the statistics pass: %s", reason)
        self.active = False
        self.parts.clear()
        self.unchecked.clear()

    def take_block(
        self, prefix: str, names, token_sizes: list[int]
    ) -> tuple[list[list[str]], dict]:
        """The stages of ``names`` (groups sharing an input, in call order) and what each
        stage's refit reads of the dense model, split into batches of ``token_sizes``
        tokens and keyed by the stage's first name: per batch the input, or ``{name:
        x W^T}`` for a stage kept as outputs. Everything kept under ``prefix`` is
        released."""
        if not self.active:
            raise RankcutError("the dense stage inputs were not kept")
        groups = self._stages(names)
        missing = set(names) - {n for g in groups.values() for n in g}
        if missing:
            raise RankcutError(f"modules never called in the statistics pass: {sorted(missing)}")
        taken = {k: self.parts.pop(k) for k in list(self.parts) if k[1].startswith(prefix)}
        inputs: dict = {}
        for owner, stage in groups.items():
            if owner not in self.outputs:
                inputs[stage[0]] = _split(_pop(taken, ("in", owner)), token_sizes, stage[0])
                continue
            outs = {n: _split(_pop(taken, ("out", n)), token_sizes, n) for n in stage}
            inputs[stage[0]] = [
                dict(zip(outs, batch, strict=True)) for batch in zip(*outs.values(), strict=True)
            ]
        return list(groups.values()), inputs


def _pop(taken: dict, key: tuple[str, str]) -> list[Tensor]:
    parts = taken.pop(key, None)
    if parts is None:
        raise RankcutError(f"nothing of the dense stream kept for {key[1]}")
    return parts


def _split(parts: list[Tensor], sizes: list[int], name: str) -> list[Tensor]:
    """``parts`` (rows in order) regrouped into batches of ``sizes`` rows."""
    if [p.shape[0] for p in parts] == sizes:
        return parts
    rows = sum(p.shape[0] for p in parts)
    if rows != sum(sizes):
        raise RankcutError(
            f"{name}: {rows} dense input rows kept, the compressed stream has {sum(sizes)}"
        )
    whole = torch.cat(parts)
    parts.clear()
    return list(whole.split(sizes))
