"""``rankcut methods``: the registered methods, one line each."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("methods", help="list registered methods")
    parser.set_defaults(func=cmd_methods)
    return parser


def cmd_methods(args: argparse.Namespace) -> int:
    from ..methods import METHODS

    width = max(len(n) for n in METHODS)
    for name in sorted(METHODS):
        print(f"{name:<{width}}  {METHODS[name].summary}")
    return 0
