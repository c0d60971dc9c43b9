"""What the commands share: global flags, flags generated from option dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any


def add_global_flags(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """``--debug`` and ``-q/--quiet``, before the command or (``subcommand``) after it.

    After the command they default to ``SUPPRESS``: an absent flag then leaves the
    value given before the command alone instead of resetting it to ``False``.
    """
    default = argparse.SUPPRESS if subcommand else False
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars or info"
    )


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(key, value)``, the value read as JSON when it parses."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls`` (a ``rankcut.recipe.Options`` dataclass).

    Names, help, choices and metavars come from the fields (``rankcut.recipe._opt``),
    so an option is declared once. Every flag defaults to ``None`` = not given, so
    that ``given_options`` can lay flags over a recipe file.

    Example:
        >>> from rankcut.recipe import CompressRecipe
        >>> parser = argparse.ArgumentParser()
        >>> add_option_flags(parser, CompressRecipe)
        >>> parser.parse_args(["--seq-len", "64", "--no-refit"]).seq_len
        64
    """
    types = cls.field_types()
    for f in dataclasses.fields(cls):
        kind, _ = types[f.name]
        meta = f.metadata
        help_text = meta["help"]
        if meta["show_default"] and kind is not bool:
            help_text += f" (default {f.default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if kind is bool:
            kwargs.update(action="store_const", const=not f.default)
        elif kind is list:
            kwargs.update(nargs="+")
        elif kind is dict:
            kwargs.update(action="append", type=parse_option, metavar=meta["metavar"])
        else:
            kwargs.update(type=kind, metavar=meta["metavar"], choices=cls.choices(f.name))
        parser.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), **kwargs)


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that were given as flags, e.g. ``{"ratio": 0.3}``."""
    given = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            # --option is repeatable: a list of (key, value) pairs.
            given[f.name] = dict(value) if cls.field_types()[f.name][0] is dict else value
    return given


def silence_libraries() -> None:
    """-q also hides transformers' and the hub's own progress bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_seq_len(model: str, seq_len: int | None) -> int:
    """``--seq-len`` checked against the model's positions, or the default that fits
    (``rankcut.runner.fit_seq_len``: a given length is refused, the default shortened).

    Example:
        >>> resolve_seq_len("no-such-model", 64)  # doctest: +SKIP
        64
    """
    from ..runner import fit_seq_len

    return fit_seq_len(model, seq_len, "--seq-len")
