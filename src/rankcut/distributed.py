"""Several processes on one compression, with ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Launched by ``torchrun --nproc-per-node N -m rankcut compress ...`` (or ``rankcut
compress --nproc N``, which runs torchrun). Every rank streams its share of the
calibration windows through the blocks; the sufficient statistics (Gram matrices,
absolute sums, token counts, dense x compressed cross products) are summed with
``all_reduce``; the matrices of a block are divided among the ranks, each factorized
by its owner and broadcast, so all ranks hold the same compressed block before
feeding it their activations; rank 0 writes the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Dist:
    """This process's place in an initialized process group."""

    rank: int
    world: int

    @classmethod
    def current(cls) -> Dist | None:
        """The running group, or ``None`` for a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that factorizes the ``index``-th matrix of a block."""
        return index % self.world

    def all_reduce(self, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def reduce_stats(self, stats, cross: Tensor | None) -> None:
        """Sum ``InputStats`` (and the cross product) over the ranks, in place."""
        for name in ("gram", "abs_sum"):
            t = getattr(stats, name)
            if t is not None:
                self.all_reduce(t)
        device = stats.gram.device if stats.gram is not None else "cpu"
        tokens = torch.tensor([stats.tokens], dtype=torch.float64, device=device)
        stats.tokens = int(self.all_reduce(tokens).item())
        if cross is not None:
            self.all_reduce(cross)

    def share(self, tensors: list[Tensor] | None, shapes, dtype, device, src: int) -> list[Tensor]:
        """Broadcast ``tensors`` (given on ``src``, of ``shapes``) to every rank."""
        import torch.distributed as dist

        if self.rank == src:
            out = [t.to(dtype=dtype, device=device).contiguous() for t in tensors]
        else:
            out = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
        for t in out:
            dist.broadcast(t, src=src)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def init_from_env(device: str) -> Dist | None:
    """Join the group torchrun describes (``WORLD_SIZE`` > 1), else ``None``."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Dist.current()


def split_windows(windows: Tensor, dist: Dist | None) -> Tensor:
    """This rank's contiguous share of the calibration windows."""
    if dist is None:
        return windows
    if windows.shape[0] < dist.world:
        from .errors import RankcutError

        raise RankcutError(
            f"{windows.shape[0]} calibration windows cannot be split across {dist.world} processes"
        )
    return torch.tensor_split(windows, dist.world)[dist.rank]
