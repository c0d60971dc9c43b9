"""``rankcut eval``: held-out perplexity and parameter counts of a model or folder."""

from __future__ import annotations

import argparse
import json
import time

from ..recipe import DEVICES


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("eval", help="held-out perplexity and parameter counts")
    parser.add_argument("model", metavar="MODEL_OR_DIR")
    parser.add_argument(
        "--data",
        default="shakespeare-heldout",
        help="evaluation text (default shakespeare-heldout)",
    )
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text to score (4096)")
    parser.add_argument(
        "--seq-len", type=int, help="window length (512, or the model's positions if fewer)"
    )
    parser.add_argument("--device", choices=DEVICES, help="default: cuda when available")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=cmd_eval)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from .. import io
    from ..data import load_text
    from ..evaluate import param_summary, perplexity
    from ..runner import check_seq_len, resolve_device
    from .common import resolve_seq_len

    device = resolve_device(args.device)
    io.hf_location(args.model)  # clear error for bad paths/aliases
    args.seq_len = resolve_seq_len(args.model, args.seq_len)
    text = load_text(args.data)
    tokenizer = io.load_tokenizer(args.model)
    model = io.load(args.model, device=device)
    check_seq_len(model, args.seq_len, "--seq-len")  # a hub id declares it only once loaded
    start = time.perf_counter()
    report = perplexity(
        model, tokenizer, text, tokens=args.tokens, seq_len=args.seq_len, progress=not args.quiet
    )
    meta = getattr(model, "rankcut_meta", {}) or {}
    report.update(param_summary(model))
    report.update(
        model=args.model,
        data=args.data,
        method=(meta.get("method_config") or {}).get("method"),
        device=device,
        seconds=round(time.perf_counter() - start, 3),
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{args.model}: perplexity {report['perplexity']:.3f} on {report['tokens']} tokens "
            f"of {args.data} (seq-len {args.seq_len}); params {report['params_total']:,} "
            f"(dense equivalent {report['params_dense_equivalent']:,})"
        )
    return 0
