"""Command line: ``rankcut compress | eval | finetune | train | bench | inspect | export | methods``.

Thin by design: each command (one module here) builds the options the Python API takes
and calls it; ``compress`` flags are generated from ``rankcut.recipe.CompressRecipe``.
Errors that a user can fix are printed as one line (``--debug`` shows the traceback).

Example:
    >>> from rankcut.cli import main
    >>> main(["methods"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import RankcutError
from . import bench, compress, eval, export, finetune, inspect, methods, train
from .allocator import tune_allocator
from .common import add_global_flags, silence_libraries

#: One module per command, in ``--help`` order; each has ``register(subparsers)``.
COMMANDS = (compress, eval, finetune, train, bench, export, inspect, methods)


def build_parser() -> argparse.ArgumentParser:
    """The ``rankcut`` parser; each command sets ``func`` to the function it runs.

    Example:
        >>> build_parser().parse_args(["eval", "runs/x", "-q"]).quiet
        True
    """
    parser = argparse.ArgumentParser(
        prog="rankcut", description="Compress transformers by low-rank factorization."
    )
    add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        add_global_flags(command.register(sub), subcommand=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the exit status.

    Example:
        >>> main(["-q", "methods"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --nproc relaunches the same command under torchrun
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # basicConfig only acts once per process; in-process callers (tests, notebooks)
    # still get each call's -q.
    logging.getLogger("rankcut").setLevel(level)
    if args.quiet:
        silence_libraries()
    tune_allocator(huge_pages=getattr(args, "huge_pages", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        close_progress_bars()
        print("rankcut: interrupted; nothing was written", file=sys.stderr)
        return 130
    except RankcutError as err:
        close_progress_bars()
        if args.debug:
            raise
        print(f"rankcut: error: {err}", file=sys.stderr)
        return 2


def close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the error starts its own line.

    A bar that was running is left mid-line (``leave=False`` bars redraw with ``\\r``);
    closing it clears or ends that line before the message is printed.
    """
    from tqdm.auto import tqdm  # the class every rankcut bar is made from

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
