"""``rankcut compress``: a recipe (file, then flags) run by ``rankcut.run``."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from ..recipe import CompressRecipe
from .common import add_option_flags, given_options

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("compress", help="compress a model and save it")
    parser.add_argument(
        "--recipe", help="JSON (or YAML) file with these options; flags override it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="streaming: run on N processes through torchrun (gloo on CPU, NCCL on GPUs)",
    )
    add_option_flags(parser, CompressRecipe)
    # huge pages: its statistics pass grows to gigabytes (``cli.allocator``)
    parser.set_defaults(func=cmd_compress, huge_pages=True)
    return parser


def recipe_from_args(args: argparse.Namespace) -> CompressRecipe:
    """The defaults, then the ``--recipe`` file, then the flags given."""
    recipe = CompressRecipe.from_file(args.recipe) if args.recipe else CompressRecipe()
    return recipe.merged(given_options(args, CompressRecipe))


def cmd_compress(args: argparse.Namespace) -> int:
    from ..runner import run

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args)
    result = run(recipe_from_args(args), overwrite=args.overwrite, progress=not args.quiet)
    if result.meta is None:  # not rank 0 of a multi-process run: rank 0 reports
        return 0
    print(result.summary())
    print(f"saved to {result.out}")
    return 0


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command under ``torchrun --standalone --nproc-per-node N``."""
    argv = list(args.argv)
    i = argv.index("--nproc") if "--nproc" in argv else None
    if i is not None:
        del argv[i : i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(args.nproc), "-m", "rankcut", *argv]
    logger.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)
