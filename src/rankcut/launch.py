"""The ``rankcut`` executable: the command line, started where MKL runs its fast kernels.

PyTorch's x86 builds do their float32 and float64 linear algebra in MKL (``sgemm`` for
every ``nn.Linear`` forward and backward and rankcut's Gram products, ``dgemm`` and
LAPACK for the spectra, Cholesky factors and solves). MKL chooses its code path by CPU
*vendor*: on AMD processors it runs slower kernels than the instruction set allows,
AVX2 ones even on AVX-512 CPUs (``perf`` on the Zen 5 VM below: ``sgemm`` spends its
time in ``mkl_blas_def_sgemm_kernel_0_zen``; with the shim, in
``mkl_blas_avx512_sgemm_kernel_0``). MKL asks one internal function whether the CPU is
Intel's, ``mkl_serv_intel_cpu_true``; a library that defines it to answer yes, loaded
first (``LD_PRELOAD``), lets MKL choose by instruction set, as it does on Intel CPUs.
The arithmetic stays IEEE float32/float64 (other kernels: other summation orders,
differences at rounding level). Measured on the project's 2-core AMD EPYC (Zen 5) VM,
2 threads: a 2048 x 576 by 576 x 1536 float32 product 123-177 -> 264-366 GFLOP/s by
layout; the default ``rankcut compress`` of SmolLM2-135M 135.2 s -> 82.4 s (medians of
three alternated runs), ``rankcut eval`` over 16384 tokens 39.1 s -> 27.2 s, the same
perplexities to the printed digits (``benchmarks/results/compress_ab.md``,
``compress_time.md``).

So on AMD x86-64 Linux, the commands that multiply large matrices (``COMMANDS``) start
again at once, before PyTorch is imported, with that one-line library preloaded. It is
compiled from ``SHIM_SOURCE`` with the system C compiler (``$CC``, ``cc`` or ``gcc``)
into the cache folder once; without a compiler the command runs as it is.
``RANKCUT_MKL_VENDOR_FIX=0`` turns this off, ``=1`` applies it on any x86-64 Linux
CPU (Intel's included, where it changes nothing). ``bench`` runs without it: it
measures the model as the user's own PyTorch runs it. A library user can preload the
file this module prints (``python -m rankcut.launch``) for the same effect.

This module imports neither torch nor the rest of rankcut (but ``rankcut.cache``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .cache import cache_dir

logger = logging.getLogger(__name__)

#: The whole preloaded library.
SHIM_SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
ENV = "RANKCUT_MKL_VENDOR_FIX"
#: Set in the process started again (its ``LD_PRELOAD`` holds the shim): never twice.
MARK = "RANKCUT_MKL_SHIM"
#: Commands whose time goes into large matrix products.
COMMANDS = frozenset({"compress", "eval", "finetune", "train"})


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's ``vendor_id`` (``AuthenticAMD``, ``GenuineIntel``), ``None`` if unknown."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def wanted(argv: Sequence[str], environ: Mapping[str, str], vendor: str | None) -> bool:
    """Whether ``rankcut argv`` should start again with the shim preloaded."""
    setting = environ.get(ENV, "")
    if setting == "0" or environ.get(MARK) or command_of(argv) not in COMMANDS:
        return False
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return setting == "1" or vendor == "AuthenticAMD"


def compiler(environ: Mapping[str, str] = os.environ) -> str | None:
    """The C compiler's path: ``$CC``, else ``cc``, else ``gcc``; ``None`` if none."""
    found = (shutil.which(name) for name in (environ.get("CC"), "cc", "gcc") if name)
    return next((path for path in found if path), None)


def shim(folder: Path | None = None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The compiled shim (built once, atomically, into ``folder``/mkl), or ``None``
    when it cannot be built here (no compiler, a read-only cache)."""
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:12]
    folder = (folder or cache_dir(environ)) / "mkl"
    path = folder / f"libmkl_vendor_check-{digest}.so"
    if path.exists():
        return path
    cc = compiler(environ)
    if cc is None:
        logger.debug("no C compiler: MKL keeps its vendor check")
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = Path(tmp) / "shim.c"
            src.write_text(SHIM_SOURCE)
            out = Path(tmp) / path.name
            subprocess.run(
                [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src)],
                check=True,
                capture_output=True,
                timeout=60,
            )
            os.replace(out, path)  # whole or not at all
    except (OSError, subprocess.SubprocessError) as err:
        logger.debug("could not build the MKL shim: %s", err)
        return None
    return path


def relaunch_env(path: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the shim first in ``LD_PRELOAD`` and the mark set."""
    env = dict(environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{path}:{preload}" if preload else str(path)
    env[MARK] = str(path)
    return env


def main() -> int:
    """``rankcut`` on the command line: start again with the shim where ``wanted``,
    then run the command (``rankcut.cli.main``)."""
    argv = sys.argv[1:]
    if sys.executable and wanted(argv, os.environ, cpu_vendor()):
        path = shim()
        if path is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                os.execve(
                    sys.executable,
                    [sys.executable, "-m", "rankcut", *argv],
                    relaunch_env(path, os.environ),
                )
            except OSError as err:  # (exec refused: run here, as without the shim)
                logger.debug("could not start again with the MKL shim: %s", err)
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    found = shim()
    if found is None:
        sys.exit("rankcut: the MKL shim cannot be built here (no C compiler)")
    print(found)
