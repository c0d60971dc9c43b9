"""``rankcut finetune``: recovery fine-tune of a saved folder (``finetune_folder``)."""

from __future__ import annotations

import argparse

from ..recipe import FinetuneOptions
from .common import add_option_flags, given_options


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("finetune", help="recovery fine-tune of a compressed model's factors")
    parser.add_argument("model", metavar="DIR", help="a rankcut output folder")
    parser.add_argument("--out", help="output folder (default: replace DIR atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_option_flags(parser, FinetuneOptions)
    parser.set_defaults(func=cmd_finetune)
    return parser


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..runner import finetune_folder

    options = FinetuneOptions.from_dict(given_options(args, FinetuneOptions))
    result = finetune_folder(
        args.model, options, out=args.out, overwrite=args.overwrite, progress=not args.quiet
    )
    print(result.summary())
    print(f"saved to {result.out}")
    return 0
