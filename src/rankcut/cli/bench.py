"""``rankcut bench``: prefill/decode speed and memory, against a dense baseline."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError, RankcutError
from ..recipe import DEVICES


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("bench", help="prefill/decode speed and memory, against a baseline")
    parser.add_argument("model", metavar="MODEL_OR_DIR")
    parser.add_argument(
        "--baseline",
        help="dense model timed alternately in the same run ('source': the rankcut "
        "folder's source_model)",
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences (1)")
    parser.add_argument("--prompt", type=int, default=512, help="prefill tokens per sequence (512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (128)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed runs (5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=DEVICES, help="default: cuda when available")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import io
    from ..evaluate.speed import SpeedSettings, compare, format_comparison
    from ..runner import resolve_device

    for name in ("batch", "prompt", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    device = resolve_device(args.device)
    kind, location = io.hf_location(args.model)
    baseline_spec = args.baseline
    if baseline_spec == "source":
        if kind != "rankcut":
            raise RankcutError("--baseline source needs a rankcut output folder as MODEL")
        baseline_spec = io.read_meta(location).get("source_model")
        if not baseline_spec:
            raise RankcutError("no source_model in rankcut.json; name --baseline explicitly")
    if baseline_spec:
        io.hf_location(baseline_spec)
    model = io.load(args.model, device=device)
    baseline = io.load(baseline_spec, device=device) if baseline_spec else None
    settings = SpeedSettings(
        batch=args.batch,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
    )
    result = compare(model, baseline, settings, progress=not args.quiet)
    result.update(model_spec=args.model, baseline_spec=baseline_spec)
    print(json.dumps(result) if args.json else format_comparison(result))
    return 0
