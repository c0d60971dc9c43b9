"""Small decompositions on one thread, so that a shared machine does not stall them.

An eigendecomposition, Cholesky factorization or SVD of a small matrix is a long chain
of small BLAS calls, each a parallel region whose threads meet at a barrier. When
another job holds some of the cores, every barrier waits for a descheduled thread:
``torch.linalg.eigh`` of a 128 x 128 matrix took 0.94 s on 2 threads beside another
job, against 0.0024 s on 1 thread. Below ``SMALL_DECOMPOSITION`` rows and columns a
second thread can gain at most half of the time even on a quiet machine (see the
constant), so such problems run on one thread and the previous thread count is
restored afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)
T = TypeVar("T")
R = TypeVar("R")

#: Largest matrix side run on one thread. Measured on this project's 2-core machine
#: with other jobs running (float64, 1 thread against 2): ``eigh`` of 128 took 6 ms
#: against 321 ms, of 512 0.14 s against 16.9 s, of 1024 0.64 s against 29 s;
#: ``cholesky`` of 1024 50 ms against 104 ms. A second thread can save at most half of
#: the time on a quiet machine, and loses many times that on a shared one.
SMALL_DECOMPOSITION = 1024


@contextmanager
def threads_for(
    size: int, device: torch.device | str | None = None, limit: int | None = None
) -> Iterator[None]:
    """Run the block on one intra-op thread when ``size`` (the largest side of the
    matrices involved) is at most ``limit`` (default ``SMALL_DECOMPOSITION``); the
    thread count in force before is restored on exit, exceptions included.

    A no-op for larger problems, when one thread is in force already, and for a
    ``device`` other than the CPU (whose work does not run on the CPU's threads). The
    setting is process-wide (``torch.set_num_threads``), as every intra-op thread
    count is.

    Example:
        >>> before = torch.get_num_threads()
        >>> with threads_for(64):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    limit = SMALL_DECOMPOSITION if limit is None else limit
    previous = torch.get_num_threads()
    on_cpu = device is None or torch.device(device).type == "cpu"
    if size > limit or previous == 1 or not on_cpu:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _largest_side(args, kwargs) -> int | None:
    """The largest side of the CPU tensors among the arguments (``None`` if a tensor
    lives on another device: its threads are not the CPU's)."""
    side = 0
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            if value.device.type != "cpu":
                return None
            side = max(side, *value.shape) if value.ndim else side
    return side


def small_on_one_thread(fn: F) -> F:
    """Decorate a decomposition: it runs under ``threads_for(largest side)`` of its
    tensor arguments (CPU tensors only; a GPU call is left alone).

    Example:
        >>> @small_on_one_thread
        ... def threads(x):
        ...     return torch.get_num_threads()
        >>> threads(torch.eye(4))
        1
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        side = _largest_side(args, kwargs)
        if side is None:
            return fn(*args, **kwargs)
        with threads_for(side):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def map_one_thread_each(
    fn: Callable[[T], R], items: Sequence[T], workers: int | None = None
) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` Python threads (default: the intra-op
    thread count in force), each running torch on one intra-op thread.

    For many small decompositions (the allocation's spectra, one ``eigh`` per matrix):
    one per core at a time keeps every core busy with no barrier between them, where a
    single decomposition on all cores spends most of its time in them (see the module
    docstring). Every worker sets its own thread count (OpenMP keeps one per thread);
    the caller's count is restored afterwards. Results keep the order of ``items``;
    with one worker or one item it is a plain loop on the calling thread.

    Example:
        >>> map_one_thread_each(lambda x: (x * x, torch.get_num_threads()), [1, 2, 3])
        [(1, 1), (4, 1), (9, 1)]
    """
    previous = torch.get_num_threads()
    workers = max(1, min(workers or previous, len(items)))
    if workers == 1:
        return [fn(x) for x in items]

    def run(x: T) -> R:
        torch.set_num_threads(1)
        return fn(x)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="rankcut-decompose") as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(previous)
