"""``rankcut inspect``: singular-value spectra, effective rank, low-rank test."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..recipe import DEVICES


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("inspect", help="singular-value spectra, effective rank, low-rank test")
    parser.add_argument("model", metavar="MODEL_OR_DIR")
    parser.add_argument("--calib", help="calibration text for whitened spectra (default: raw only)")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (8)")
    parser.add_argument(
        "--seq-len", type=int, help="tokens per window (512, or the model's positions if fewer)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.2, 0.4], help="energy kept at these (0.2 0.4)"
    )
    parser.add_argument("--beta-min", type=float, default=0.1, help="low-rank threshold (0.1)")
    parser.add_argument("--targets", nargs="+", help="regexes of modules to inspect")
    parser.add_argument("--exclude", nargs="+", help="regexes of modules to skip")
    parser.add_argument("--out", help="folder for inspect.md/.json and PNG plots")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--device", choices=DEVICES, help="default: cuda when available")
    parser.set_defaults(func=cmd_inspect)
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    from .. import io
    from ..analysis import format_table, inspect_model, write_inspect
    from ..rank.budget import check_ratio
    from ..runner import check_seq_len, resolve_device
    from .common import resolve_seq_len

    for ratio in args.ratios:
        check_ratio(ratio)
    if args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    if args.out:  # before any work: a spectrum of a large model takes a while
        io.check_output_dir(args.out, args.overwrite)
    device = resolve_device(args.device)
    io.hf_location(args.model)
    calib = None
    if args.calib:
        from ..data import calibration_windows, load_text

        args.seq_len = resolve_seq_len(args.model, args.seq_len)
        text = load_text(args.calib)
        tokenizer = io.load_tokenizer(args.model)
        calib = calibration_windows(text, tokenizer, args.samples, args.seq_len, args.seed)
    model = io.load(args.model, device=device)
    if calib is not None:
        check_seq_len(model, args.seq_len, "--seq-len")  # a hub id declares it only now
    info = inspect_model(
        model,
        calib,
        tuple(args.ratios),
        beta_min=args.beta_min,
        targets=args.targets,
        exclude=args.exclude,
        progress=not args.quiet,
    )
    print(format_table(info))
    if args.out:
        for path in write_inspect(info, args.out, title=str(args.model)):
            print(f"wrote {path}")
    return 0
