"""Command line: ``rankcut compress | eval | methods``.

Thin by design: it builds the same config objects as the Python API. Errors that a
user can fix are printed as one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .data.generated import RECOVERY_SEQ_LEN, RECOVERY_STEPS
from .errors import ConfigError, RankcutError

logger = logging.getLogger("rankcut")

COMPRESS_DEFAULTS = {
    "model": "smollm2-135m",
    "method": "svd-llm",
    "ratio": 0.2,
    "calib": "auto",
    "samples": 32,
    "seq_len": 512,
    "out": None,
    "device": None,
    "seed": 0,
    "targets": None,
    "exclude": [],
    "option": {},
    "allocation": "global",
    "pipeline": "auto",
    "refit": True,
    "min_rank_fraction": 0.25,
    "recover": 0,
    "recover_lr": 1e-4,
    "recover_lora": 0,
    "recover_data": "auto",
    "recover_windows": None,
    "recover_seq_len": RECOVERY_SEQ_LEN,
    "distill": 1.0,
    "eval_data": None,
}


def _allocator_names() -> list[str]:
    from .rank import ALLOCATORS

    return sorted(ALLOCATORS)


def _method_names() -> list[str]:
    from .methods import METHODS

    return sorted(METHODS)


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankcut", description="Compress transformers by low-rank factorization."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("--recipe", help="JSON (or YAML) file with these options; flags override it")
    c.add_argument(
        "--model",
        help="built-in alias, HF folder, .gguf, hub id or rankcut output "
        f"(default {COMPRESS_DEFAULTS['model']})",
    )
    c.add_argument("--method", choices=_method_names(), help="default svd-llm")
    c.add_argument("--ratio", type=float, help="fraction of targeted parameters removed (0.2)")
    c.add_argument(
        "--calib",
        help="calibration data: built-in corpus, .txt file or folder, hf:NAME[:CONFIG]:SPLIT, "
        "'generated' (sampled from the model) or a mix A+B; default 'auto': "
        "shakespeare+generated for causal LMs, shakespeare for encoders",
    )
    c.add_argument("--samples", type=int, help="calibration windows (32)")
    c.add_argument("--seq-len", type=int, help="tokens per calibration window (512)")
    c.add_argument("--out", help="output folder (default runs/MODEL-METHOD-RATIO)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    c.add_argument("--seed", type=int, help="seed for window sampling (0)")
    c.add_argument("--targets", nargs="+", help="regexes of modules to factorize")
    c.add_argument("--exclude", nargs="+", help="regexes of modules to leave dense")
    c.add_argument(
        "--option",
        action="append",
        type=_parse_option,
        metavar="KEY=VALUE",
        help="method config field, e.g. --option alpha=0.5 (repeatable)",
    )

    c.add_argument(
        "--allocation",
        choices=_allocator_names(),
        help="how ranks are spread under the global budget (default global)",
    )
    c.add_argument(
        "--pipeline",
        choices=["auto", "whole", "sequential"],
        help="whole-model statistics, or decoder block by block with a refit to the dense "
        "outputs; auto (default): sequential when calibration is used, in memory",
    )
    c.add_argument(
        "--no-refit",
        dest="refit",
        action="store_const",
        const=False,
        help="sequential pipeline: do not refit to the dense outputs",
    )
    c.add_argument(
        "--min-rank-fraction",
        type=float,
        help="rank floor of non-uniform allocations, fraction of uniform (0.25)",
    )
    c.add_argument(
        "--recover",
        type=int,
        metavar="STEPS",
        help="recovery fine-tune of the factors for STEPS windows (default 0: off)",
    )
    c.add_argument("--recover-lr", type=float, help="recovery learning rate (1e-4)")
    c.add_argument(
        "--recover-lora",
        type=int,
        metavar="R",
        help="recovery trains a rank-R LoRA (peft) on the factors, merged at the end "
        "(default 0: train the factors)",
    )
    c.add_argument(
        "--recover-data",
        help="recovery training data, as --calib (default 'auto': text sampled from the "
        "dense model for causal LMs)",
    )
    c.add_argument(
        "--recover-windows",
        type=int,
        metavar="N",
        help="recovery: distinct training windows (default: STEPS, each seen once)",
    )
    c.add_argument(
        "--recover-seq-len",
        type=int,
        metavar="T",
        help=f"recovery: tokens per training window ({RECOVERY_SEQ_LEN})",
    )
    c.add_argument(
        "--distill",
        type=float,
        help="recovery: share of distillation from the dense model in the loss (1.0; 0 = CE only)",
    )
    c.add_argument(
        "--eval-data",
        help="held-out text: perplexity before and after (4096 tokens) in the report",
    )
    c.add_argument(
        "--offload-dir",
        help="streaming: folder for the resume state and the calibration activations "
        "(default: beside --out)",
    )
    c.add_argument(
        "--offload-mb",
        type=float,
        default=1024,
        help="streaming: activations above this size (MiB) are read back from disk (1024)",
    )
    c.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="streaming: run on N processes through torchrun (gloo on CPU, NCCL on GPUs)",
    )
    c.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole model even for a safetensors folder with --pipeline sequential",
    )
    e = sub.add_parser("eval", help="held-out perplexity and parameter counts")
    e.add_argument("model", metavar="MODEL_OR_DIR")
    e.add_argument(
        "--data",
        default="shakespeare-heldout",
        help="evaluation text (default shakespeare-heldout)",
    )
    e.add_argument("--tokens", type=int, default=4096, help="tokens of text to score (4096)")
    e.add_argument("--seq-len", type=int, default=512, help="window length (512)")
    e.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    f = sub.add_parser("finetune", help="recovery fine-tune of a compressed model's factors")
    f.add_argument("model", metavar="DIR", help="a rankcut output folder")
    f.add_argument(
        "--steps",
        type=int,
        default=RECOVERY_STEPS,
        help=f"optimizer steps, one window each ({RECOVERY_STEPS})",
    )
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (1e-4)")
    f.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="train a rank-R LoRA (peft) on the factors, merged at the end (0: the factors)",
    )
    f.add_argument(
        "--distill",
        type=float,
        default=1.0,
        help="share of distillation from the source model in the loss (1.0; 0 = CE only)",
    )
    f.add_argument(
        "--data",
        default="auto",
        help="training data, as compress --calib (default 'auto': text sampled from the "
        "source model for causal LMs)",
    )
    f.add_argument(
        "--windows",
        type=int,
        metavar="N",
        help="distinct training windows (default: STEPS, each seen once)",
    )
    f.add_argument(
        "--train-seq-len",
        type=int,
        default=RECOVERY_SEQ_LEN,
        help=f"tokens per training window ({RECOVERY_SEQ_LEN})",
    )
    f.add_argument("--seq-len", type=int, default=512, help="evaluation window length (512)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--eval-data",
        default="shakespeare-heldout",
        help="held-out text for before/after perplexity ('' to skip)",
    )
    f.add_argument("--eval-tokens", type=int, default=4096)
    f.add_argument("--out", help="output folder (default: replace DIR atomically)")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    f.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")

    b = sub.add_parser("bench", help="prefill/decode speed and memory, against a baseline")
    b.add_argument("model", metavar="MODEL_OR_DIR")
    b.add_argument(
        "--baseline",
        help="dense model timed alternately in the same run ('source': the rankcut "
        "folder's source_model)",
    )
    b.add_argument("--batch", type=int, default=1, help="sequences (1)")
    b.add_argument("--prompt", type=int, default=512, help="prefill tokens per sequence (512)")
    b.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (128)")
    b.add_argument("--repeats", type=int, default=5, help="alternating timed runs (5)")
    b.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    x = sub.add_parser("export", help="write a compressed model for other tools")
    x.add_argument("model", metavar="DIR", help="a rankcut output folder")
    x.add_argument(
        "--merge",
        action="store_true",
        help="multiply the factors back: a plain dense Hugging Face checkpoint",
    )
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    i = sub.add_parser("inspect", help="singular-value spectra, effective rank, low-rank test")
    i.add_argument("model", metavar="MODEL_OR_DIR")
    i.add_argument("--calib", help="calibration text for whitened spectra (default: raw only)")
    i.add_argument("--samples", type=int, default=8, help="calibration windows (8)")
    i.add_argument("--seq-len", type=int, default=512, help="tokens per window (512)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument(
        "--ratios", type=float, nargs="+", default=[0.2, 0.4], help="energy kept at these (0.2 0.4)"
    )
    i.add_argument("--beta-min", type=float, default=0.1, help="low-rank threshold (0.1)")
    i.add_argument("--targets", nargs="+", help="regexes of modules to inspect")
    i.add_argument("--exclude", nargs="+", help="regexes of modules to skip")
    i.add_argument("--out", help="folder for inspect.md/.json and PNG plots")
    i.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    sub.add_parser("methods", help="list registered methods")
    return parser


def _device(name: str | None) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise RankcutError("--device cuda requested but no CUDA device is available")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _read_recipe(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RankcutError(f"path does not exist: {path}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml  # optional

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError as err:
        raise RankcutError("YAML recipes need PyYAML (pip install pyyaml)") from err
    except Exception as err:
        raise RankcutError(f"cannot parse recipe {path}: {err}") from err
    if not isinstance(data, dict):
        raise RankcutError(f"recipe {path} must hold an object of options")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(COMPRESS_DEFAULTS))
    if unknown:
        raise RankcutError(f"unknown recipe keys in {path}: {', '.join(unknown)}")
    for key, value in data.items():
        expected = RECIPE_TYPES[key]
        ok = isinstance(value, expected[0]) and (
            expected[0] == (bool,) or not isinstance(value, bool)
        )
        if ok and expected[0] == (list,):
            ok = all(isinstance(v, str) for v in value)
        if not ok and not (
            value is None and key in ("out", "device", "targets", "eval_data", "recover_windows")
        ):
            raise RankcutError(f"recipe {path}: {key!r} must be {expected[1]}, got {value!r}")
    return data


#: Recipe value types: (isinstance check, description for the error message).
RECIPE_TYPES = {
    "model": ((str,), "a string"),
    "method": ((str,), "a string"),
    "ratio": ((int, float), "a number"),
    "calib": ((str,), "a string"),
    "samples": ((int,), "an integer"),
    "seq_len": ((int,), "an integer"),
    "out": ((str,), "a string"),
    "device": ((str,), "a string"),
    "seed": ((int,), "an integer"),
    "targets": ((list,), "a list of regex strings"),
    "exclude": ((list,), "a list of regex strings"),
    "option": ((dict,), "an object of KEY: VALUE"),
    "allocation": ((str,), "a string"),
    "pipeline": ((str,), "a string"),
    "refit": ((bool,), "true or false"),
    "min_rank_fraction": ((int, float), "a number"),
    "recover": ((int,), "an integer"),
    "recover_lr": ((int, float), "a number"),
    "recover_lora": ((int,), "an integer"),
    "recover_data": ((str,), "a string"),
    "recover_windows": ((int,), "an integer"),
    "recover_seq_len": ((int,), "an integer"),
    "distill": ((int, float), "a number"),
    "eval_data": ((str,), "a string"),
}


def resolve_compress_options(args: argparse.Namespace) -> dict:
    """Defaults, then the recipe file, then explicit flags."""
    opts = dict(COMPRESS_DEFAULTS)
    if args.recipe:
        opts.update(_read_recipe(args.recipe))
    for key in COMPRESS_DEFAULTS:
        value = getattr(args, key, None)
        if key == "option":
            if value:
                opts["option"] = {**opts.get("option", {}), **dict(value)}
        elif value is not None:
            opts[key] = value
    return opts


CONFIG_FLAGS = (
    "ratio",
    "targets",
    "exclude",
    "allocation",
    "pipeline",
    "refit",
    "min_rank_fraction",
)


def cmd_compress(args: argparse.Namespace) -> int:
    import copy

    import torch

    from . import api, io
    from .data import load_text
    from .data.distill import DistillWindows
    from .data.generated import (
        AUTO,
        AUTO_ENCODER,
        GENERATED,
        recovery_windows,
        resolve_recovery_spec,
        resolve_spec,
        validate_spec,
        windows_from_spec,
    )
    from .methods import get_method
    from .models import resolve
    from .rank import ALLOCATORS

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args)
    opts = resolve_compress_options(args)
    spec = get_method(opts["method"])
    _check_options(spec, opts["option"])
    fields = {k: opts[k] for k in CONFIG_FLAGS}
    fields["exclude"] = fields["exclude"] or []
    config = spec.config_cls(**fields, **opts["option"])
    recover = opts["recover"]
    if recover < 0:
        raise ConfigError(f"--recover must be >= 0, got {recover}")
    out = Path(
        opts["out"] or f"runs/{Path(str(opts['model'])).stem}-{opts['method']}-{opts['ratio']}"
    )
    io.check_output_dir(out, args.overwrite)  # fail before any heavy work
    device = _device(opts["device"])
    torch.manual_seed(opts["seed"])
    resolve(str(opts["model"]))  # a clear error for bad paths/aliases before loading
    needs_data = bool(
        spec.needs
        or ALLOCATORS[config.allocation].needs
        or config.pipeline == "sequential"
        or recover
    )
    calib_spec = str(opts["calib"])
    if needs_data:
        validate_spec(calib_spec)  # before loading the model
    heldout = load_text(str(opts["eval_data"])) if opts["eval_data"] else None
    started = time.perf_counter()
    tokenizer = io.load_tokenizer(str(opts["model"]))
    # Recovery trains the whole model, so it is loaded whole (no streaming) then.
    if not recover and _streams(opts, config, args):
        # Streaming never holds the whole model, so there is nothing to sample from.
        calib_spec = opts["calib"] = AUTO_ENCODER if calib_spec == AUTO else calib_spec
        if GENERATED in [p.strip() for p in calib_spec.split("+")]:
            raise ConfigError(
                "generated calibration needs the whole model; use --in-memory or a text"
            )
        calib = windows_from_spec(
            calib_spec, tokenizer, opts["samples"], opts["seq_len"], opts["seed"]
        )
        return _compress_streaming(opts, config, args, calib, tokenizer, device, out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RankcutError(
            "several processes need the streaming pipeline: a local safetensors folder "
            "with --pipeline sequential"
        )
    model = io.load(str(opts["model"]), device=device)
    calib_spec = opts["calib"] = resolve_spec(calib_spec, model)
    calib = None
    if needs_data:
        calib = windows_from_spec(
            calib_spec,
            tokenizer,
            opts["samples"],
            opts["seq_len"],
            opts["seed"],
            model=model,
            progress=not args.quiet,
        )
    recovery_data = None
    recovery_spec = resolve_recovery_spec(str(opts["recover_data"]), model)
    if recover:  # sampled from the dense model, so before it is compressed
        recovery_data = recovery_windows(
            recovery_spec,
            tokenizer,
            recover,
            opts["recover_seq_len"],
            opts["seed"],
            count=opts["recover_windows"],
            model=model,
            progress=not args.quiet,
        )
    # Sampled recovery data carries the teacher's targets; only text needs a teacher copy.
    needs_teacher = (
        recover and opts["distill"] > 0 and not isinstance(recovery_data, DistillWindows)
    )
    teacher = copy.deepcopy(model) if needs_teacher else None
    phases = {"loading": time.perf_counter() - started}
    ppl = _compress_eval(model, tokenizer, heldout, opts, args.quiet, phases, "dense")
    result = api.compress(model, config, calib, progress=not args.quiet)
    phases.update(result.extra.get("phases", {}))
    print(result.summary())
    extra = {
        "source_model": str(opts["model"]),
        "calibration": None
        if calib is None
        else {
            "data": str(opts["calib"]),
            "samples": opts["samples"],
            "seq_len": opts["seq_len"],
            "seed": opts["seed"],
        },
        "ranks": result.ranks,
        "kept_dense": result.kept_dense,
        "compression_seconds": round(result.seconds, 3),
    }
    if recover:
        extra["recovery"] = _run_recovery(
            model,
            teacher,
            recovery_data,
            recover,
            opts["recover_lr"],
            opts["distill"],
            args.quiet,
            lora_rank=opts["recover_lora"],
        )
        extra["recovery"]["data"] = recovery_spec  # resolved, as finetune records it
        del teacher, recovery_data
    if heldout is not None:
        ppl.update(
            _compress_eval(model, tokenizer, heldout, opts, args.quiet, phases, "compressed")
        )
        print(
            f"held-out perplexity ({opts['eval_data']}): {ppl['dense']:.3f} -> "
            f"{ppl['compressed']:.3f}"
        )
        extra["perplexity"] = ppl
    extra["phases"] = {k: round(v, 3) for k, v in phases.items()}
    recipe = {**opts, "out": str(out)}
    io.save(
        result.model,
        out,
        tokenizer=tokenizer,
        overwrite=args.overwrite,
        extra=extra,
        files={"recipe.json": json.dumps(recipe, indent=2) + "\n"},
    )
    _write_report(out)
    print(f"saved to {out}")
    return 0


def _compress_eval(model, tokenizer, heldout, opts, quiet, phases, label) -> dict:
    """Held-out perplexity for the report, timed as its own phase (nothing without text)."""
    if heldout is None:
        return {}
    from .evaluate import perplexity

    start = time.perf_counter()
    value = perplexity(model, tokenizer, heldout, tokens=4096, seq_len=512, progress=not quiet)
    phases[f"evaluation ({label})"] = time.perf_counter() - start
    return {"data": str(opts["eval_data"]), label: value["perplexity"]}


def _write_report(out) -> None:
    from .report import write_report

    write_report(out)


def _streams(opts: dict, config, args: argparse.Namespace) -> bool:
    """Stream (one decoder layer in memory) for a local safetensors folder, sequentially."""
    from .models import resolve
    from .streaming import is_safetensors_dir

    if config.pipeline != "sequential" or args.in_memory:
        return False
    kind, location = resolve(str(opts["model"]))
    return kind == "hf-dir" and is_safetensors_dir(location)


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command under ``torchrun --standalone --nproc-per-node N``."""
    import subprocess

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


def _compress_streaming(opts, config, args, calib, tokenizer, device, out) -> int:
    """``compress`` for a safetensors folder, layer by layer (see ``rankcut.streaming``)."""
    import dataclasses

    from .distributed import init_from_env
    from .rank import ALLOCATORS
    from .streaming import stream_compress

    dist = init_from_env(device)

    if ALLOCATORS[config.allocation].needs and opts["allocation"] == "global":
        explicit = args.allocation is not None or (
            args.recipe and "allocation" in _read_recipe(args.recipe)
        )
        if not explicit:
            # The default allocation needs whole-model spectra and gradients: streaming
            # falls back to uniform ranks (an explicit choice is refused instead).
            logger.warning(
                "streaming: allocation 'global' needs the whole model; using 'uniform' "
                "(pass --in-memory for global allocation)"
            )
            config = dataclasses.replace(config, allocation="uniform")
            opts = {**opts, "allocation": "uniform"}
    extra = {
        "source_model": str(opts["model"]),
        "calibration": {
            "data": str(opts["calib"]),
            "samples": opts["samples"],
            "seq_len": opts["seq_len"],
            "seed": opts["seed"],
        },
    }
    recipe = {**opts, "out": str(out)}
    meta = stream_compress(
        opts["model"],
        config,
        calib,
        out,
        tokenizer=tokenizer,
        device=device,
        work_dir=args.offload_dir,
        activation_limit_mb=args.offload_mb,
        overwrite=args.overwrite,
        extra=extra,
        files={"recipe.json": json.dumps(recipe, indent=2) + "\n"},
        progress=not args.quiet,
        dist=dist,
    )
    if dist is not None:
        import torch.distributed

        torch.distributed.destroy_process_group()
    if meta is None:  # not rank 0: the output is written by rank 0
        return 0
    p = meta["params"]
    print(
        f"method {config.method}, ratio {config.ratio}, allocation {config.allocation} "
        f"(streamed {len(meta['streaming']['layer_seconds'])} layers, "
        f"{1 if dist is None else dist.world} process(es))\n"
        f"factorized {len(meta['ranks'])} matrices, kept {len(meta['kept_dense'])} dense\n"
        f"model params    {p['model_before']:,} -> {p['model_after']:,}"
    )
    print(f"saved to {out}")
    return 0


def _run_recovery(model, teacher, windows, steps, lr, distill, quiet, lora_rank=0):
    """Fine-tune the factors on ``windows`` (see ``recovery_windows``)."""
    from .finetune import RecoveryConfig, recover

    config = RecoveryConfig(steps=steps, lr=lr, distill=distill, lora_rank=lora_rank)
    stats = recover(model, windows, config, teacher=teacher, progress=not quiet)
    losses = stats["losses"]
    head = sum(losses[:10]) / len(losses[:10])
    tail = sum(losses[-10:]) / len(losses[-10:])
    print(f"recovery: {steps} steps in {stats['seconds']:.0f} s, loss {head:.3f} -> {tail:.3f}")
    return {
        "config": stats["config"],
        "seconds": round(stats["seconds"], 1),
        "loss_first10": head,
        "loss_last10": tail,
        "windows": int(windows.shape[0]),
    }


def cmd_finetune(args: argparse.Namespace) -> int:
    from . import io
    from .data import load_text
    from .data.distill import DistillWindows
    from .data.generated import (
        GENERATED,
        recovery_windows,
        resolve_recovery_spec,
        validate_spec,
    )
    from .evaluate import perplexity

    device = _device(args.device)
    kind, location = io.hf_location(args.model)
    if kind != "rankcut":
        raise RankcutError(f"finetune needs a rankcut output folder, got {args.model!r}")
    out = Path(args.out or args.model)
    in_place = out.resolve() == Path(location).resolve()
    if not in_place:
        io.check_output_dir(out, args.overwrite)
    validate_spec(args.data)
    heldout = load_text(args.eval_data) if args.eval_data else None
    tokenizer = io.load_tokenizer(args.model)
    model = io.load(args.model, device=device)
    meta = io.read_meta(location)
    teacher = None
    if args.distill > 0:
        source = meta.get("source_model")
        if not source:
            raise RankcutError("no source_model in rankcut.json to distill from (use --distill 0)")
        teacher = io.load(source, device=device)
    spec = resolve_recovery_spec(args.data, model)
    sampler = teacher  # generated training data is sampled from the dense source model
    if sampler is None and GENERATED in spec.split("+"):
        source = meta.get("source_model")
        if not source:
            raise RankcutError(
                "generated training data needs the source model; give --data TEXT instead"
            )
        sampler = io.load(source, device=device)

    def ppl():
        return perplexity(
            model,
            tokenizer,
            heldout,
            tokens=args.eval_tokens,
            seq_len=args.seq_len,
            progress=not args.quiet,
        )["perplexity"]

    before = ppl() if heldout else None
    started = time.perf_counter()
    windows = recovery_windows(
        spec,
        tokenizer,
        args.steps,
        args.train_seq_len,
        args.seed,
        count=args.windows,
        model=sampler,
        progress=not args.quiet,
    )
    data_seconds = time.perf_counter() - started
    if GENERATED in spec.split("+"):
        print(f"recovery data: {windows.shape[0]} windows sampled in {data_seconds:.0f} s")
    del sampler
    if isinstance(windows, DistillWindows):
        teacher = None  # its top-k targets were stored with the windows
    recovery = _run_recovery(
        model, teacher, windows, args.steps, args.lr, args.distill, args.quiet, lora_rank=args.lora
    )
    recovery.update(data=spec, data_seconds=round(data_seconds, 1))
    del teacher
    after = ppl() if heldout else None
    if heldout:
        recovery.update(eval_data=args.eval_data, perplexity_before=before, perplexity_after=after)
        print(f"held-out perplexity ({args.eval_data}): {before:.3f} -> {after:.3f}")
    keep = {
        k: v
        for k, v in meta.items()
        if k
        not in (
            "layers",
            "tied",
            "format",
            "format_version",
            "architecture",
            "dtype",
            "rankcut_version",
        )
    }
    keep["recovery"] = recovery
    files = {}
    recipe = Path(location) / "recipe.json"
    if recipe.is_file():
        files["recipe.json"] = recipe.read_text()
    io.save(
        model,
        out,
        tokenizer=tokenizer,
        overwrite=True if in_place else args.overwrite,
        extra=keep,
        files=files,
    )
    _write_report(out)
    print(f"saved to {out}")
    return 0


def _check_options(spec, options: dict) -> None:
    import dataclasses

    names = {f.name for f in dataclasses.fields(spec.config_cls)} - set(CONFIG_FLAGS)
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(
            f"unknown option(s) for {spec.name}: {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(names)) or 'none'}"
        )


def cmd_eval(args: argparse.Namespace) -> int:
    from . import io
    from .data import load_text
    from .evaluate import param_summary, perplexity

    device = _device(args.device)
    io.hf_location(args.model)  # clear error for bad paths/aliases
    text = load_text(args.data)
    tokenizer = io.load_tokenizer(args.model)
    model = io.load(args.model, device=device)
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


def cmd_bench(args: argparse.Namespace) -> int:
    from . import io
    from .evaluate.speed import SpeedSettings, compare, format_comparison

    for name in ("batch", "prompt", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    device = _device(args.device)
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
    if args.json:
        print(json.dumps(result))
    else:
        print(format_comparison(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import io

    if not args.merge:
        raise ConfigError(
            "export writes merged dense checkpoints only: pass --merge (a factorized "
            "folder is already loadable with rankcut.load)"
        )
    io.check_output_dir(args.out, args.overwrite)
    out = io.export_merged(args.model, args.out, overwrite=args.overwrite)
    print(f"saved a dense Hugging Face checkpoint to {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import io
    from .analysis import format_table, inspect_model, write_inspect
    from .rank.budget import check_ratio

    for ratio in args.ratios:
        check_ratio(ratio)
    device = _device(args.device)
    io.hf_location(args.model)
    calib = None
    if args.calib:
        from .data import calibration_windows, load_text

        text = load_text(args.calib)
        tokenizer = io.load_tokenizer(args.model)
        calib = calibration_windows(text, tokenizer, args.samples, args.seq_len, args.seed)
    model = io.load(args.model, device=device)
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


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    width = max(len(n) for n in METHODS)
    for name in sorted(METHODS):
        print(f"{name:<{width}}  {METHODS[name].summary}")
    return 0


def _silence_libraries() -> None:
    """-q also hides transformers' and the hub's own progress bars."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


COMMANDS = {
    "compress": cmd_compress,
    "eval": cmd_eval,
    "finetune": cmd_finetune,
    "methods": cmd_methods,
    "bench": cmd_bench,
    "export": cmd_export,
    "inspect": cmd_inspect,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.quiet:
        _silence_libraries()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("rankcut: interrupted; nothing was written", file=sys.stderr)
        return 130
    except RankcutError as err:
        if args.debug:
            raise
        print(f"rankcut: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
