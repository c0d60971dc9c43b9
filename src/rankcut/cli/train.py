"""``rankcut train``: train with low rank (from scratch or from a pretrained model) and save.

Builds a ``rankcut.train.loop.TrainConfig`` from the flags and calls
``rankcut.train.loop.train``; see ``docs/train.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..recipe import DEVICES

#: The methods of issue 17, for ``--help`` (the registry, ``rankcut.train.methods``, is
#: what validates ``--method``; reading it here would import torch to build the parser).
METHOD_HELP = "dense, lrt, sltrain, maestro, trp or galore (see docs/train.md)"


def parse_train_option(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> ``(key, value)``; the method parses the value.

    Example:
        >>> parse_train_option("energy=0.99")
        ('energy', '0.99')
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), value


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train", help="train with low rank (from scratch or a pretrained model) and save"
    )
    add = parser.add_argument
    add(
        "--data",
        required=True,
        metavar="TEXT",
        help="training text: corpus name, .txt file or folder",
    )
    add(
        "--eval-data",
        metavar="TEXT",
        help="validation text (default: shakespeare-heldout for shakespeare, else the "
        "last 10%% of --data, never trained on)",
    )
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--model", help="start from a pretrained model (alias, folder, hub id)")
    source.add_argument(
        "--arch", help="from scratch: tiny (default), micro, or a Llama config JSON file"
    )
    add(
        "--method",
        default="dense",
        metavar="NAME",
        help=f"training method: {METHOD_HELP} (default dense)",
    )
    add("--rank", type=int, metavar="R", help="the method's rank (galore: its projection rank)")
    add(
        "--param-ratio",
        type=float,
        metavar="P",
        help="factorized methods hold this fraction of the dense targets' parameters, (0, 1]",
    )
    add("--steps", type=int, default=200, metavar="N", help="optimizer steps (200)")
    add("--batch", type=int, default=8, metavar="B", help="windows per step (8)")
    add("--seq-len", type=int, default=128, metavar="L", help="tokens per window (128)")
    add("--lr", type=float, help="peak learning rate (1e-3 from scratch, 5e-5 from --model)")
    add(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of weights, method and data order (0)",
    )
    add("--out", metavar="DIR", help="output folder (default runs/train-SOURCE-METHOD)")
    add(
        "--resume", action="store_true", help="continue the killed run whose checkpoint is in --out"
    )
    add("--overwrite", action="store_true", help="replace a non-empty --out")
    add(
        "--option",
        action="append",
        type=parse_train_option,
        default=[],
        metavar="KEY=VALUE",
        help="a method option (repeatable)",
    )
    add(
        "--eval-every",
        type=int,
        metavar="N",
        default=50,
        help="validation perplexity every N steps (50)",
    )
    add(
        "--eval-tokens",
        type=int,
        metavar="N",
        default=16384,
        help="validation tokens scored (16384)",
    )
    add(
        "--checkpoint-every",
        type=int,
        metavar="N",
        default=50,
        help="checkpoint every N steps (50; 0 never)",
    )
    add(
        "--warmup",
        type=int,
        metavar="N",
        help="linear warm-up steps (default 5%% of --steps, at most 100)",
    )
    add("--schedule", default="cosine", help="after the warm-up: cosine (default) or constant")
    add("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (1.0; 0 off)")
    add(
        "--vocab-size",
        type=int,
        metavar="N",
        default=8192,
        help="from scratch: BPE vocabulary size (8192)",
    )
    add("--device", choices=DEVICES, help="default: cuda when available")
    parser.set_defaults(func=cmd_train)
    return parser


def default_out(args: argparse.Namespace) -> str:
    """``runs/train-SOURCE-METHOD[-rR|-pP]`` for a run without ``--out``.

    Example:
        >>> default_out(argparse.Namespace(model=None, arch=None, method="lrt", rank=None,
        ...                                param_ratio=0.5))
        'runs/train-tiny-lrt-p0.5'
    """
    source = Path(args.model).name if args.model else Path(args.arch or "tiny").stem
    name = f"train-{source}-{args.method}"
    if args.rank is not None:
        name += f"-r{args.rank}"
    elif args.param_ratio is not None:
        name += f"-p{args.param_ratio:g}"
    return str(Path("runs") / name)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.loop import TrainConfig, train

    config = TrainConfig(
        data=args.data,
        eval_data=args.eval_data,
        model=args.model,
        arch=args.arch,
        method=args.method,
        rank=args.rank,
        param_ratio=args.param_ratio,
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        out=args.out or default_out(args),
        options=dict(args.option),
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        checkpoint_every=args.checkpoint_every,
        warmup=args.warmup,
        schedule=args.schedule,
        grad_clip=args.grad_clip,
        vocab_size=args.vocab_size,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    result = train(config, progress=not args.quiet)
    print("\n".join(result.lines()))
    print(f"saved to {result.out}")
    return 0
