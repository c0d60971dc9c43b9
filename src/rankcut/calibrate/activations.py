"""The targets' inputs kept from a whole-model pass, for the sequential pipeline's
dense stream.

With ``refit`` the sequential pipeline needs, block by block, the inputs the *dense*
model gives each stage (q/k/v, o, gate/up, down), and used to rerun every dense block
to get them. The allocation's statistics pass has already run the dense model over the
very same windows: ``StageInputs`` keeps what the targets received there, one tensor per
distinct input (modules sharing an input share it), so no dense block runs again.

This costs memory: every stage input of every block at once (float32 SmolLM2-135M at
32 x 512 tokens: about 6 GB), freed block by block as the pipeline goes. It is kept
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

    ``record(name, owner, x)`` is called for every target call (``owner``: the first
    module that received the same tensor); the inputs of owners are kept, flattened to
    ``(tokens, in)``, until ``take_block`` hands a block's to the pipeline.

    Args:
        tokens: tokens the pass will run (windows times length): the projection of the
            total size that decides, at each owner's first input, whether it fits.
        budget: bytes the inputs may take (default: ``MEMORY_FRACTION`` of the free
            memory on the device of the first input).
    """

    def __init__(self, tokens: int, budget: int | None = None) -> None:
        self.tokens = int(tokens)
        self.budget = budget
        self.parts: dict[str, list[Tensor]] = {}
        self.row_bytes: dict[str, int] = {}  # bytes per token of each owner's input
        self.order: list[str] = []  # every target, in the order of its first call
        self.owner_of: dict[str, str] = {}
        self.active = True

    @property
    def expected_bytes(self) -> int:
        return sum(self.row_bytes.values()) * self.tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.parts.values() for t in parts)

    def record(self, name: str, owner: str, x: Tensor) -> None:
        if name not in self.owner_of:
            self.order.append(name)
            self.owner_of[name] = owner
        if not self.active or name != owner:
            return
        if owner not in self.row_bytes:
            if self.budget is None:
                self.budget = int(MEMORY_FRACTION * free_bytes(x.device))
            self.row_bytes[owner] = x.shape[-1] * x.element_size()
            if self.expected_bytes > self.budget:
                self.drop(
                    f"they would take {self.expected_bytes / 2**30:.2f} GiB, more than "
                    f"{self.budget / 2**30:.2f} GiB ({MEMORY_FRACTION:.0%} of the free memory)"
                )
                return
        self.parts.setdefault(owner, []).append(x.detach().reshape(-1, x.shape[-1]))

    def covers(self, names) -> bool:
        """Whether the pass kept the inputs of every one of ``names``."""
        return self.active and all(n in self.owner_of for n in names)

    def retain(self, names) -> None:
        """Release the inputs no one of ``names`` reads (those of matrices kept dense)."""
        needed = {self.owner_of[n] for n in names if n in self.owner_of}
        for owner in [o for o in self.parts if o not in needed]:
            del self.parts[owner]

    def drop(self, reason: str) -> None:
        """Keep nothing more (the pipeline reruns the dense blocks instead)."""
        if self.active:
            logger.info("not keeping the dense stage inputs of the statistics pass: %s", reason)
        self.active = False
        self.parts.clear()

    def take_block(
        self, prefix: str, names, token_sizes: list[int]
    ) -> tuple[list[list[str]], dict[str, list[Tensor]]]:
        """The stages of ``names`` (groups sharing an input, in call order) and each
        stage's dense inputs split into batches of ``token_sizes`` tokens, keyed by the
        stage's first name; every input kept under ``prefix`` is released."""
        if not self.active:
            raise RankcutError("the dense stage inputs were not kept")
        wanted = set(names)
        groups: dict[str, list[str]] = {}
        for name in self.order:
            if name in wanted:
                groups.setdefault(self.owner_of[name], []).append(name)
        missing = wanted - {n for g in groups.values() for n in g}
        if missing:
            raise RankcutError(f"modules never called in the statistics pass: {sorted(missing)}")
        taken = {o: self.parts.pop(o) for o in list(self.parts) if o.startswith(prefix)}
        inputs = {}
        for owner, stage in groups.items():
            parts = taken.pop(owner, None)
            if parts is None:
                raise RankcutError(f"no dense inputs kept for {stage[0]}")
            inputs[stage[0]] = _split(parts, token_sizes, stage[0])
        return list(groups.values()), inputs


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
