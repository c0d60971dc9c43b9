"""Run a ``CompressRecipe`` end to end, and fine-tune a saved folder.

``run`` is what ``rankcut compress`` does: load, calibrate, compress, recover, evaluate,
save and report, or stream a safetensors folder block by block. ``finetune_folder`` is
``rankcut finetune``. Both return a ``RunResult`` whose ``lines`` are what the CLI
prints; as they go they log the same lines (``logging``, logger ``rankcut.runner``).

Example:
    >>> import rankcut
    >>> from rankcut import CompressRecipe
    >>> result = rankcut.run(CompressRecipe(model="smollm2-135m", ratio=0.2))  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RankcutError
from .recipe import CompressRecipe, FinetuneOptions

if TYPE_CHECKING:
    from torch import Tensor, nn

    from .finetune import RecoveryConfig
    from .methods import MethodConfig

logger = logging.getLogger(__name__)

#: Held-out perplexity of a compress run: fixed so that reports compare across runs.
EVAL_TOKENS = 4096
EVAL_SEQ_LEN = 512
#: rankcut.json entries that ``save`` writes itself; finetune keeps the rest.
_SAVE_OWNED = (
    "layers",
    "tied",
    "format",
    "format_version",
    "architecture",
    "dtype",
    "rankcut_version",
)


@dataclass
class RunResult:
    """What ``run`` or ``finetune_folder`` did.

    Attributes:
        out: the output folder.
        meta: the ``rankcut.json`` written; ``None`` on the ranks other than 0 of a
            multi-process streaming run (rank 0 writes).
        recipe: the resolved recipe written as ``recipe.json`` (``out`` filled in,
            ``calib`` resolved); ``None`` for a fine-tune.
        model: the compressed model in memory; ``None`` when it was streamed.
        lines: the summary lines (what ``rankcut compress`` prints).
    """

    out: Path
    meta: dict[str, Any] | None
    recipe: CompressRecipe | None = None
    model: nn.Module | None = None
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The summary lines, joined."""
        return "\n".join(self.lines)

    def say(self, text: str) -> None:
        """Record a summary line, and log it as it happens (runs can take hours)."""
        logger.info("%s", text)
        self.lines.append(text)


def resolve_device(name: str | None) -> str:
    """``name``, or ``cuda`` when available else ``cpu``; a clear error without CUDA.

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise RankcutError("--device cuda requested but no CUDA device is available")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


#: Config fields in which Hugging Face configs declare the longest sequence a model takes.
_POSITION_FIELDS = ("max_position_embeddings", "n_positions")


def declared_positions(model: str | os.PathLike | nn.Module) -> int | None:
    """The longest sequence the model's config declares, or ``None`` if it declares none.

    ``model`` is a loaded model (its ``config``) or a model spec; for a local folder
    the ``config.json`` is read without loading anything, and a hub id or GGUF file
    (whose config needs a download or a parse) gives ``None``, to be checked once loaded.
    """
    config: Any = getattr(model, "config", None)
    if config is None and isinstance(model, (str, os.PathLike)):
        from .models import resolve

        kind, location = resolve(str(model))
        path = Path(location) / "config.json"
        if kind not in ("rankcut", "hf-dir") or not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # a broken config.json gets its own error when the model loads
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for name in _POSITION_FIELDS:
        value = get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model: str | os.PathLike | nn.Module, seq_len: int | None, flag: str) -> None:
    """A ``RankcutError`` when ``seq_len`` exceeds the positions the model's config declares.

    Without this a GPT-2 (learned positions) fails deep inside its forward with an
    ``IndexError``; the check reads only the config, never the model's name.

    Example:
        >>> check_seq_len("no-such-model-skipped-for-none", None, "--seq-len")
    """
    if seq_len is None:
        return
    if seq_len < 1:
        raise RankcutError(f"{flag} must be at least 1, got {seq_len}")
    limit = declared_positions(model)
    if limit is not None and seq_len > limit:
        raise RankcutError(
            f"{flag} {seq_len} is longer than the model's {limit} positions "
            f"(its config's max_position_embeddings / n_positions); use {flag} {limit} or less"
        )


#: Calibration window length when none is given (shortened to the model's positions).
DEFAULT_SEQ_LEN = 512


def fit_seq_len(
    model, value: int | None, flag: str, default: int = DEFAULT_SEQ_LEN, final: bool = True
) -> int | None:
    """A window length ``model`` takes: ``value`` checked, or the default that fits.

    A length the user gave (``value``) beyond the model's positions is refused; when
    none was given (``None``), ``default`` is shortened to the positions instead, since
    the user asked for no particular length. With ``final=False`` a model that does not
    declare its positions yet (a hub id or GGUF file before loading) keeps ``None``, to
    be fitted once it is loaded.

    Example:
        >>> from types import SimpleNamespace
        >>> gpt2 = SimpleNamespace(config=SimpleNamespace(n_positions=128))
        >>> fit_seq_len(gpt2, None, "--seq-len"), fit_seq_len(gpt2, 64, "--seq-len")
        (128, 64)
    """
    if value is not None:
        check_seq_len(model, value, flag)
        return value
    limit = declared_positions(model)
    if limit is None:
        return None if not final else default
    if limit < default:
        logger.info("%s: the default %d is longer than the model; using %d", flag, default, limit)
        return limit
    return default


def _fit_seq_lens(model, recipe: CompressRecipe, needs_data: bool, final: bool) -> CompressRecipe:
    """``recipe`` with window lengths that ``model`` takes, or a ``RankcutError``.

    Lengths left unset get the default that fits (written to ``recipe.json``); lengths
    given beyond the model's positions are refused, when they are used.
    """
    from .data.recovery import RECOVERY_SEQ_LEN

    changes = {}
    lengths = (
        ("seq_len", DEFAULT_SEQ_LEN, needs_data),
        ("recover_seq_len", RECOVERY_SEQ_LEN, bool(recipe.recover)),
    )
    for name, default, used in lengths:
        value, flag = getattr(recipe, name), "--" + name.replace("_", "-")
        if value is None:
            changes[name] = fit_seq_len(model, None, flag, default, final)
        elif used:
            check_seq_len(model, value, flag)
    return dataclasses.replace(recipe, **changes) if changes else recipe


def run(recipe: CompressRecipe, *, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Compress, optionally recover and evaluate, and save, as ``recipe`` says.

    The same steps, in the same order and with the same random numbers, as
    ``rankcut compress``: a recipe file run here or through the CLI gives the same
    folder. Recovery data sampled from the model is drawn from the dense model before
    it is compressed. A local safetensors folder with ``pipeline="sequential"`` (and
    no ``in_memory``, no recovery) is streamed one decoder block at a time; under
    ``torchrun`` (``WORLD_SIZE`` > 1) the processes share that streaming run.

    Args:
        recipe: what to do.
        overwrite: replace a non-empty output folder.
        progress: show progress bars.

    Returns:
        A ``RunResult``; ``result.meta`` is the ``rankcut.json`` written.

    Example:
        >>> import rankcut
        >>> recipe = rankcut.CompressRecipe(model="smollm2-135m", method="svd", ratio=0.3,
        ...     allocation="uniform", out="runs/svd")
        >>> result = rankcut.run(recipe, overwrite=True)  # doctest: +SKIP
        >>> result.meta["method_config"]["ratio"]  # doctest: +SKIP
        0.3
    """
    import torch

    from . import io
    from .data import load_text
    from .data.generated import validate_spec
    from .methods import get_method
    from .models import resolve
    from .rank import ALLOCATORS

    config = recipe.method_config()
    if recipe.recover:
        recipe.recovery_config()  # a bad recovery option fails now, not after compressing
    spec = get_method(recipe.method)
    out = recipe.output_dir()
    io.check_output_dir(out, overwrite)  # fail before any heavy work (writability too)
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    kind, _ = resolve(recipe.model)  # a clear error for bad paths/aliases before loading
    needs_data = bool(
        spec.needs
        or ALLOCATORS[config.allocation].needs
        or config.pipeline == "sequential"
        or recipe.recover
    )
    # A hub id or GGUF file declares its positions only once loaded: fitted again then.
    recipe = _fit_seq_lens(recipe.model, recipe, needs_data, final=kind not in ("hub", "gguf"))
    if needs_data:
        validate_spec(recipe.calib)  # before loading the model
    heldout = load_text(recipe.eval_data) if recipe.eval_data else None
    started = time.perf_counter()
    tokenizer = io.load_tokenizer(recipe.model)
    # Recovery trains the whole model, so it is loaded whole (no streaming) then.
    if not recipe.recover and _streams(recipe, config):
        return _run_streaming(recipe, config, tokenizer, device, out, heldout, overwrite, progress)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RankcutError(
            "several processes need the streaming pipeline: a local safetensors folder "
            "with --pipeline sequential"
        )
    return _run_in_memory(
        recipe, config, tokenizer, device, out, heldout, needs_data, started, overwrite, progress
    )


def _run_in_memory(
    recipe, config, tokenizer, device, out, heldout, needs_data, started, overwrite, progress
) -> RunResult:
    from . import api, io
    from .data.distill import DistillWindows
    from .data.generated import resolve_spec
    from .data.generated import windows_from_spec as calibration_from_spec
    from .data.recovery import recovery_windows, resolve_recovery_spec

    model = io.load(recipe.model, device=device)
    # Again on the loaded config: a hub id or GGUF file declares its positions only now.
    recipe = _fit_seq_lens(model, recipe, needs_data, final=True)
    recipe = dataclasses.replace(recipe, calib=resolve_spec(recipe.calib, model), out=str(out))
    result = RunResult(out, None, recipe)
    calib = None
    if needs_data:
        calib = calibration_from_spec(
            recipe.calib,
            tokenizer,
            recipe.samples,
            recipe.seq_len,
            recipe.seed,
            model=model,
            progress=progress,
        )
    recovery_data = None
    recovery_spec = resolve_recovery_spec(recipe.recover_data, model)
    if recipe.recover:  # sampled from the dense model, so before it is compressed
        data = recipe.recovery_data()
        recovery_data = recovery_windows(
            recovery_spec, tokenizer, **data, model=model, progress=progress
        )
    # Sampled recovery data carries the teacher's targets; only text needs a teacher copy.
    needs_teacher = (
        recipe.recover and recipe.distill > 0 and not isinstance(recovery_data, DistillWindows)
    )
    teacher = copy.deepcopy(model) if needs_teacher else None
    phases = {"loading": time.perf_counter() - started}
    ppl = _timed_perplexity(model, tokenizer, heldout, recipe.eval_data, progress, phases, "dense")
    compressed = api.compress(model, config, calib, progress=progress)
    phases.update(compressed.extra.get("phases", {}))
    result.say(compressed.summary())
    extra = {
        "source_model": recipe.model,
        "calibration": None if calib is None else _calibration_entry(recipe),
        "ranks": compressed.ranks,
        "kept_dense": compressed.kept_dense,
        "compression_seconds": round(compressed.seconds, 3),
    }
    if recipe.recover:
        extra["recovery"] = _recover(
            result, model, teacher, recovery_data, recipe.recovery_config(), progress
        )
        extra["recovery"]["data"] = recovery_spec  # resolved, as finetune records it
        del teacher, recovery_data
    if heldout is not None:
        ppl.update(
            _timed_perplexity(
                model, tokenizer, heldout, recipe.eval_data, progress, phases, "compressed"
            )
        )
        result.say(
            f"held-out perplexity ({recipe.eval_data}): {ppl['dense']:.3f} -> "
            f"{ppl['compressed']:.3f}"
        )
        extra["perplexity"] = ppl
    extra["phases"] = {k: round(v, 3) for k, v in phases.items()}
    _save(result, compressed.model, tokenizer, overwrite, extra, recipe.to_json())
    result.model = compressed.model
    return result


def _calibration_entry(recipe: CompressRecipe) -> dict[str, Any]:
    return {
        "data": recipe.calib,
        "samples": recipe.samples,
        "seq_len": recipe.seq_len,
        "seed": recipe.seed,
    }


def _save(result: RunResult, model, tokenizer, overwrite: bool, extra: dict, recipe_json) -> None:
    """Save ``model`` into ``result.out`` with its report; fill ``result.meta``."""
    from . import io
    from .report import write_report

    files = {} if recipe_json is None else {"recipe.json": recipe_json}
    # The report goes into the temporary folder (``save`` nested in ``atomic_dir`` writes
    # there): one rename publishes both, so no complete folder ever lacks its report.
    with io.atomic_dir(result.out, overwrite=overwrite) as tmp:
        io.save(model, tmp, tokenizer=tokenizer, extra=extra, files=files)
        write_report(tmp, name=Path(result.out).name)
    result.meta = io.read_meta(result.out)


def eval_seq_len(model) -> int:
    """The report's evaluation window: ``EVAL_SEQ_LEN``, or the model's positions if fewer."""
    limit = declared_positions(model)
    return EVAL_SEQ_LEN if limit is None else min(EVAL_SEQ_LEN, limit)


def _timed_perplexity(model, tokenizer, heldout, data, progress, phases, label) -> dict:
    """Held-out perplexity for the report, timed as its own phase (nothing without text)."""
    if heldout is None:
        return {}
    start = time.perf_counter()
    seq_len = eval_seq_len(model)
    value = _perplexity(model, tokenizer, heldout, EVAL_TOKENS, seq_len, progress)
    phases[f"evaluation ({label})"] = time.perf_counter() - start
    return {"data": str(data), "seq_len": seq_len, label: value}


def _perplexity(model, tokenizer, text: str, tokens: int, seq_len: int, progress: bool) -> float:
    from .evaluate import perplexity

    return perplexity(model, tokenizer, text, tokens=tokens, seq_len=seq_len, progress=progress)[
        "perplexity"
    ]


def _streams(recipe: CompressRecipe, config: MethodConfig) -> bool:
    """Stream (one decoder layer in memory) for a local safetensors folder, sequentially."""
    from .models import resolve
    from .streaming import is_safetensors_dir

    if config.pipeline != "sequential" or recipe.in_memory:
        return False
    kind, location = resolve(recipe.model)
    return kind == "hf-dir" and is_safetensors_dir(location)


def _run_streaming(
    recipe, config, tokenizer, device, out, heldout, overwrite, progress
) -> RunResult:
    """``run`` for a safetensors folder, layer by layer (see ``rankcut.streaming``)."""
    from .data.generated import windows_from_spec
    from .data.spec import AUTO, AUTO_ENCODER, GENERATED
    from .distributed import init_from_env
    from .errors import ConfigError
    from .streaming import stream_compress

    # Streaming never holds the whole model, so there is nothing to sample from.
    calib_spec = AUTO_ENCODER if recipe.calib == AUTO else recipe.calib
    if GENERATED in [p.strip() for p in calib_spec.split("+")]:
        raise ConfigError("generated calibration needs the whole model; use --in-memory or a text")
    recipe = dataclasses.replace(recipe, calib=calib_spec, out=str(out))
    calib = windows_from_spec(calib_spec, tokenizer, recipe.samples, recipe.seq_len, recipe.seed)
    evaluation = None
    if heldout is not None:  # measured block by block on the way (no whole model here)
        from .data import bos_prefix, evaluation_windows

        seq_len = eval_seq_len(recipe.model)
        evaluation = evaluation_windows(heldout, tokenizer, EVAL_TOKENS, seq_len)
    dist = init_from_env(device)
    extra = {"source_model": recipe.model, "calibration": _calibration_entry(recipe)}
    meta = stream_compress(
        recipe.model,
        config,
        calib,
        out,
        tokenizer=tokenizer,
        device=device,
        work_dir=recipe.offload_dir,
        activation_limit_mb=recipe.offload_mb,
        overwrite=overwrite,
        extra=extra,
        # A default allocation falls back to uniform there; an explicit one is refused.
        allocation_given=recipe.allocation_given,
        files={"recipe.json": recipe.to_json()},
        progress=progress,
        dist=dist,
        evaluation=evaluation,
        evaluation_prefix=len(bos_prefix(tokenizer)) if evaluation is not None else 0,
        evaluation_data=recipe.eval_data,
    )
    if dist is not None:
        import torch.distributed

        torch.distributed.destroy_process_group()
    result = RunResult(out, meta, recipe)
    if meta is None:  # not rank 0: the output is written by rank 0
        return result
    p, mc = meta["params"], meta["method_config"]
    result.say(
        f"method {mc['method']}, ratio {mc['ratio']}, allocation {mc['allocation']}, "
        f"products {mc['compute_dtype']} (streamed {len(meta['streaming']['layer_seconds'])} layers, "
        f"{1 if dist is None else dist.world} process(es))\n"
        f"factorized {len(meta['ranks'])} matrices, kept {len(meta['kept_dense'])} dense\n"
        f"model params    {p['model_before']:,} -> {p['model_after']:,}"
    )
    if "perplexity" in meta:
        ppl = meta["perplexity"]
        result.say(
            f"held-out perplexity ({ppl['data']}): {ppl['dense']:.3f} -> {ppl['compressed']:.3f}"
        )
    return result


def _recover(
    result: RunResult,
    model: nn.Module,
    teacher: nn.Module | None,
    windows: Tensor,
    config: RecoveryConfig,
    progress: bool,
) -> dict[str, Any]:
    """Fine-tune the factors on ``windows``; the ``recovery`` entry of ``rankcut.json``."""
    from .finetune import recover

    stats = recover(model, windows, config, teacher=teacher, progress=progress)
    losses = stats["losses"]
    head = sum(losses[:10]) / len(losses[:10])
    tail = sum(losses[-10:]) / len(losses[-10:])
    result.say(
        f"recovery: {config.steps} steps in {stats['seconds']:.0f} s, loss {head:.3f} -> {tail:.3f}"
    )
    return {
        "config": stats["config"],
        "seconds": round(stats["seconds"], 1),
        "loss_first10": head,
        "loss_last10": tail,
        "windows": int(windows.shape[0]),
    }


def finetune_folder(
    folder: str | os.PathLike,
    options: FinetuneOptions | None = None,
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Recovery fine-tune of the factors of the rankcut folder ``folder``, saved again.

    Distillation (``options.distill`` > 0) and generated training data take the dense
    model from the folder's ``source_model``. Held-out perplexity before and after is
    recorded in the ``recovery`` entry of ``rankcut.json`` with the training record.

    Args:
        folder: a rankcut output folder.
        options: what to train on, how long, and what to evaluate on.
        out: where to save (default: replace ``folder`` atomically).
        overwrite: replace a non-empty ``out``.
        progress: show progress bars.

    Returns:
        A ``RunResult`` (``recipe`` is ``None``; ``model`` the fine-tuned model).

    Example:
        >>> from rankcut.recipe import FinetuneOptions
        >>> from rankcut.runner import finetune_folder
        >>> result = finetune_folder("runs/svd", FinetuneOptions(steps=50))  # doctest: +SKIP
    """
    from . import io
    from .data import load_text
    from .data.distill import DistillWindows
    from .data.generated import validate_spec
    from .data.recovery import recovery_windows, resolve_recovery_spec
    from .data.spec import GENERATED

    opts = options or FinetuneOptions()
    recovery_config = opts.recovery_config()  # checked before anything loads
    device = resolve_device(opts.device)
    kind, location = io.hf_location(folder)
    if kind != "rankcut":
        raise RankcutError(f"finetune needs a rankcut output folder, got {str(folder)!r}")
    out = Path(out or folder)
    in_place = out.resolve() == Path(location).resolve()
    if not in_place:
        io.check_output_dir(out, overwrite)
    else:
        io.check_writable(out)  # the in-place rewrite goes through a temporary sibling too
    check_seq_len(folder, opts.train_seq_len, "--train-seq-len")
    if opts.eval_data:
        check_seq_len(folder, opts.eval_seq_len, "--seq-len")
    validate_spec(opts.data)
    heldout = load_text(opts.eval_data) if opts.eval_data else None
    tokenizer = io.load_tokenizer(folder)
    model = io.load(folder, device=device)
    meta = io.read_meta(location)
    teacher = None
    if opts.distill > 0:
        teacher = io.load(_source_model(meta, "to distill from (use --distill 0)"), device=device)
    spec = resolve_recovery_spec(opts.data, model)
    sampler = teacher  # generated training data is sampled from the dense source model
    if sampler is None and GENERATED in spec.split("+"):
        source = _source_model(meta, "for generated training data; give --data TEXT instead")
        sampler = io.load(source, device=device)

    def ppl() -> float:
        return _perplexity(model, tokenizer, heldout, opts.eval_tokens, opts.eval_seq_len, progress)

    result = RunResult(out, None)
    before = ppl() if heldout else None
    started = time.perf_counter()
    data = opts.recovery_data()
    windows = recovery_windows(spec, tokenizer, **data, model=sampler, progress=progress)
    data_seconds = time.perf_counter() - started
    if GENERATED in spec.split("+"):
        result.say(f"recovery data: {windows.shape[0]} windows sampled in {data_seconds:.0f} s")
    del sampler
    if isinstance(windows, DistillWindows):
        teacher = None  # its top-k targets were stored with the windows
    recovery = _recover(result, model, teacher, windows, recovery_config, progress)
    recovery.update(data=spec, data_seconds=round(data_seconds, 1))
    del teacher
    if heldout:
        after = ppl()
        recovery.update(eval_data=opts.eval_data, perplexity_before=before, perplexity_after=after)
        result.say(f"held-out perplexity ({opts.eval_data}): {before:.3f} -> {after:.3f}")
    keep = {k: v for k, v in meta.items() if k not in _SAVE_OWNED}
    keep["recovery"] = recovery
    recipe = Path(location) / "recipe.json"
    recipe_json = recipe.read_text() if recipe.is_file() else None
    _save(result, model, tokenizer, True if in_place else overwrite, keep, recipe_json)
    result.model = model
    return result


def _source_model(meta: dict, purpose: str) -> str:
    source = meta.get("source_model")
    if not source:
        raise RankcutError(f"no source_model in rankcut.json {purpose}")
    return source
