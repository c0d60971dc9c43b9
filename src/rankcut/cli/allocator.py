"""Keep freed memory in the process between the large, short-lived tensors of a run.

glibc's ``malloc`` hands blocks above its mmap threshold (128 KiB, raised at run time to
the largest block freed so far) straight back to the kernel, and trims the heap when
its free top passes a threshold. A forward pass allocates and frees the same
activations, Gram products and cross products window after window, so every window
pays the page faults of fresh memory again (measured on SmolLM2-135M on 2 cores: a
forward with gradients and input-statistics hooks took 9.0 s per 2048 tokens with the
defaults, 6.4 s with these settings; ``rankcut eval`` 41.0 s -> 37.3 s). The peak
memory does not change (what is kept was in use a moment before); it is only not given
back before the process ends. The PyTorch CPU tuning guide's advice is a different
allocator (jemalloc, tcmalloc); these ``mallopt`` settings get the same effect from the
allocator every Linux machine has.

A command whose memory grows to gigabytes (``compress``, its statistics pass) also asks
PyTorch to back its large CPU tensors with transparent huge pages
(``THP_MEM_ALLOC_ENABLE=1``: blocks of 2 MB and more are ``madvise``-d
``MADV_HUGEPAGE``). First touches of memory are what that costs: on the 2-core VM of the
benchmarks, the default ``compress`` of SmolLM2-135M faulted 2.2-2.4 M pages (its whole
peak, ~9.5 GB; 35-41 s of system time) and took 128-129 s; with huge pages 0.6 M
faults, 17-18 s of system time, 110-113 s (two runs each, alternated). ``rankcut eval``,
whose memory stays near the model's, ran ~1.7 s slower with them (36.7 s against 38.4 s,
three runs each), so other commands do without. A kernel whose THP setting is
``never`` ignores the advice.

The command line applies them (``tune_allocator``) before a command runs; a library
user's process is left as it is. ``RANKCUT_MALLOC_TUNING=0`` turns them off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap (glibc's upper bound for the threshold on
#: 64-bit machines: 32 MiB), larger ones (logits, whole-model buffers) stay mmapped.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap's top is never given back before the process ends (glibc
#: reads the ``int`` -1 as the largest ``size_t``): a backward frees the activations of
#: a whole model (3 GB for SmolLM2-135M on 2048 tokens), which any finite threshold an
#: ``int`` holds would return to the kernel only for the next window to fault them in.
TRIM_THRESHOLD = -1
#: Each growth of the heap asks for this much more than needed (fewer brk calls).
TOP_PAD = 1 << 30

ENV = "RANKCUT_MALLOC_TUNING"
#: PyTorch's switch for huge-page-backed CPU allocations (read once, at its first
#: large allocation).
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def tune_allocator(huge_pages: bool = False) -> bool:
    """Apply the settings to this process's glibc ``malloc`` (and with ``huge_pages``,
    PyTorch's huge-page switch, unless the environment sets it); whether they were
    applied (not on other C libraries or systems, nor with ``RANKCUT_MALLOC_TUNING=0``)."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if huge_pages:
        os.environ.setdefault(THP_ENV, "1")  # before PyTorch reads it (its first large block)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    logger.debug("malloc tuning %s", "applied" if ok else "refused")
    return ok
