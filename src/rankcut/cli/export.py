"""``rankcut export``: a compressed folder as a plain dense Hugging Face checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("export", help="write a compressed model for other tools")
    parser.add_argument("model", metavar="DIR", help="a rankcut output folder")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="multiply the factors back: a plain dense Hugging Face checkpoint",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=cmd_export)
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from .. import io

    if not args.merge:
        raise ConfigError(
            "export writes merged dense checkpoints only: pass --merge (a factorized "
            "folder is already loadable with rankcut.load)"
        )
    _, location = io.hf_location(args.model)
    source, out = Path(location).resolve(), Path(args.out).expanduser().resolve()
    # --overwrite would replace the compressed folder with its own dense merge.
    if out == source or source in out.parents or out in source.parents:
        raise ConfigError(
            f"--out {args.out} is the input folder {args.model} or overlaps it; name another folder"
        )
    io.check_output_dir(args.out, args.overwrite)
    out = io.export_merged(args.model, args.out, overwrite=args.overwrite)
    print(f"saved a dense Hugging Face checkpoint to {out}")
    return 0
