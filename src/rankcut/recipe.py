"""``CompressRecipe``: every option of a compress run, in one validated dataclass.

A recipe is what ``rankcut compress`` does, written down: the CLI generates its flags
from these fields (help text and choices live in each field's metadata, so no option
is declared twice), a recipe file (JSON, or YAML with PyYAML) fills the same fields,
and ``rankcut.run(recipe)`` executes it. The resolved recipe is saved as
``recipe.json`` beside the output, so a run can be repeated from its own folder.

Example:
    >>> from rankcut.recipe import CompressRecipe
    >>> recipe = CompressRecipe(model="smollm2-135m", method="svd", ratio=0.3)
    >>> recipe.to_dict()["ratio"]
    0.3
    >>> CompressRecipe.from_dict({"seq-len": 256}).seq_len
    256
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .data.recovery import RECOVERY_SEQ_LEN, RECOVERY_STEPS
from .errors import ConfigError, RankcutError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

#: What ``allocation=None`` (not chosen) means outside streaming.
DEFAULT_ALLOCATION = "global"
DEVICES = ("cpu", "cuda")
#: Recipe fields that are ``MethodConfig`` fields of every method (the rest of a
#: method's config comes from ``option``).
CONFIG_FIELDS = (
    "ratio",
    "targets",
    "exclude",
    "allocation",
    "pipeline",
    "refit",
    "min_rank_fraction",
    "compute_dtype",
)


def _method_names() -> tuple[str, ...]:
    from .methods import METHODS

    return tuple(sorted(METHODS))


def _compute_dtypes() -> tuple[str, ...]:
    from .calibrate.precision import COMPUTE_DTYPES

    return COMPUTE_DTYPES


def _allocator_names() -> tuple[str, ...]:
    from .rank import ALLOCATORS

    return tuple(sorted(ALLOCATORS))


#: Help shared by ``compress --recover-*`` and ``finetune``: the same recovery data.
_DATA_HELP = "training data, as {} ('auto': text sampled from the {} model for causal LMs)"
_WINDOWS_HELP = "distinct training windows (default: STEPS, each seen once)"


def _pipeline_names() -> tuple[str, ...]:
    from .pipelines import config_pipelines

    return config_pipelines()


def _opt(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    metavar: str | None = None,
    flag: str | None = None,
    show_default: bool = True,
) -> Any:
    """A recipe field: its default plus what the CLI needs to generate its flag.

    ``choices`` may be a function so that registries (methods, allocators) are read
    when a parser or a check needs them, not when this module is imported. ``flag``
    overrides the generated ``--kebab-name`` (e.g. ``--no-refit`` for a true default).
    """
    metadata = {"help": help, "choices": choices, "metavar": metavar, "flag": flag}
    metadata["show_default"] = show_default and default is not None
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Options:
    """Base of the option dataclasses (``CompressRecipe``, ``FinetuneOptions``).

    Values are checked against the subclass's type hints and closed choices on
    construction (one ``ConfigError`` line naming the field), ``from_dict`` is strict,
    and ``to_dict`` round-trips. Fields are declared with ``_opt`` so that the CLI can
    generate one flag per field.
    """

    #: How error messages name this kind of options.
    label: ClassVar[str] = "options"

    def __post_init__(self) -> None:
        for name, (kind, optional) in self.field_types().items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _is_kind(value, kind):
                raise ConfigError(
                    f"{self.label}: {name!r} must be {_DESCRIPTIONS[kind]}"
                    f"{' or null' if optional else ''}, got {value!r}"
                )
            if isinstance(value, tuple):  # fine from Python; a list equals its JSON
                setattr(self, name, list(value))
            choices = self.choices(name)
            if choices is not None and value not in choices:
                raise ConfigError(
                    f"{self.label}: {name!r} must be one of {', '.join(choices)}, got {value!r}"
                )

    @classmethod
    def field_types(cls) -> dict[str, tuple[type, bool]]:
        """``{name: (kind, optional)}`` from the type hints; ``kind`` is one of ``str``,
        ``int``, ``float``, ``bool``, ``list`` (of strings) or ``dict``.

        Example:
            >>> CompressRecipe.field_types()["targets"]
            (<class 'list'>, True)
        """
        return _field_types(cls)

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...] | None:
        """The closed set of values of field ``name``, or ``None`` when it is open.

        Example:
            >>> CompressRecipe.choices("device")
            ('cpu', 'cuda')
        """
        choices = _fields(cls)[name].metadata["choices"]
        return choices() if callable(choices) else choices

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Options from ``data``; ``-`` in keys reads as ``_``, unknown keys are an error.

        Example:
            >>> CompressRecipe.from_dict({"method": "svd", "min-rank-fraction": 0.5}).method
            'svd'
        """
        data = _underscored(data)
        names = _fields(cls)
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown {cls.label} keys: {', '.join(unknown)}; valid: {', '.join(names)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (a deep copy).

        Example:
            >>> CompressRecipe().to_dict()["method"]
            'svd-llm'
        """
        return dataclasses.asdict(self)

    def merged(self, changes: Mapping[str, Any]) -> Self:
        """New options with ``changes`` applied (as flags over a recipe file); a dict
        field (``option``) is merged key by key rather than replaced.

        Example:
            >>> base = CompressRecipe(option={"eps": 1e-5})
            >>> base.merged({"option": {"alpha": 0.5}}).option
            {'eps': 1e-05, 'alpha': 0.5}
        """
        data = self.to_dict()
        changes = _underscored(changes)
        for name, (kind, _) in self.field_types().items():
            if kind is dict and isinstance(changes.get(name), Mapping):
                changes[name] = {**data[name], **_underscored(changes[name])}
        return type(self).from_dict({**data, **changes})


@dataclass
class CompressRecipe(Options):
    """The options of one compress run (``rankcut compress``, ``rankcut.run``).

    Field names are the flags' names with ``_`` for ``-``; each field's help text is in
    ``dataclasses.fields(CompressRecipe)[i].metadata["help"]`` (``rankcut compress
    --help`` shows them all). Values are checked against the type hints on
    construction, so a bad recipe file fails with one line before anything loads.

    Example:
        >>> recipe = CompressRecipe(method="svd-llm", ratio=0.2, calib="shakespeare")
        >>> recipe.allocation is None  # not chosen: "global" (uniform when streaming)
        True
        >>> recipe.merged({"ratio": 0.4, "option": {"eps": 1e-5}}).ratio
        0.4
    """

    model: str = _opt("smollm2-135m", "built-in alias, HF folder, .gguf, hub id or rankcut output")
    method: str = _opt("svd-llm", "factorization method", choices=_method_names)
    ratio: float = _opt(0.2, "fraction of targeted parameters removed")
    calib: str = _opt(
        "auto",
        "calibration data: built-in corpus, .txt file or folder, hf:NAME[:CONFIG]:SPLIT, "
        "'generated' (sampled from the model) or a mix A+B; 'auto': "
        "shakespeare+generated for causal LMs, shakespeare for encoders",
    )
    samples: int = _opt(32, "calibration windows")
    seq_len: int | None = _opt(
        None, "tokens per calibration window (default 512, or the model's positions if fewer)"
    )
    out: str | None = _opt(None, "output folder (default runs/MODEL-METHOD-RATIO)")
    device: str | None = _opt(None, "default: cuda when available", choices=DEVICES)
    seed: int = _opt(0, "seed for window sampling")
    targets: list[str] | None = _opt(None, "regexes of modules to factorize")
    exclude: list[str] = _opt([], "regexes of modules to leave dense", show_default=False)
    option: dict[str, Any] = _opt(
        {},
        "method config field, e.g. --option alpha=0.5 (repeatable)",
        metavar="KEY=VALUE",
        show_default=False,
    )
    # None records that the user did not choose: streaming then falls back to uniform
    # ranks, while an explicit data-hungry choice is refused (stream_compress decides).
    allocation: str | None = _opt(
        None,
        "how ranks are spread under the global budget (default global; streaming falls "
        "back to uniform unless one is chosen)",
        choices=_allocator_names,
    )
    pipeline: str = _opt(
        "auto",
        "whole-model statistics, or decoder block by block with a refit to the dense "
        "outputs; auto: sequential when calibration is used, in memory",
        choices=_pipeline_names,
    )
    refit: bool = _opt(
        True,
        "sequential pipeline: refit each block to the dense outputs (--no-refit: only "
        "take the statistics from the compressed prefix)",
        flag="--no-refit",
    )
    min_rank_fraction: float = _opt(
        0.25, "rank floor of non-uniform allocations, fraction of uniform"
    )
    compute_dtype: str = _opt(
        "auto",
        "precision of the model's linear products over the calibration windows (statistics "
        "and factors stay float32/64); auto: bfloat16 where measured 1.5x faster (AMX, "
        "AVX512-BF16, GPU), else float32 (exact)",
        choices=_compute_dtypes,
    )
    recover: int = _opt(
        0,
        "recovery fine-tune of the factors for STEPS windows (default 0: off)",
        metavar="STEPS",
        show_default=False,
    )
    recover_lr: float = _opt(1e-4, "recovery learning rate")
    recover_lora: int = _opt(
        0,
        "recovery trains a rank-R LoRA (peft) on the factors, merged at the end "
        "(default 0: train the factors)",
        metavar="R",
        show_default=False,
    )
    recover_data: str = _opt("auto", "recovery " + _DATA_HELP.format("--calib", "dense"))
    recover_windows: int | None = _opt(None, "recovery: " + _WINDOWS_HELP, metavar="N")
    recover_seq_len: int | None = _opt(
        None,
        f"recovery: tokens per training window (default {RECOVERY_SEQ_LEN}, or the model's "
        "positions if fewer)",
        metavar="T",
    )
    distill: float = _opt(
        1.0, "recovery: share of distillation from the dense model in the loss (0 = CE only)"
    )
    eval_data: str | None = _opt(
        None, "held-out text: perplexity before and after (4096 tokens) in the report"
    )
    offload_dir: str | None = _opt(
        None,
        "streaming: folder for the resume state and the calibration activations "
        "(default: beside --out)",
    )
    offload_mb: float = _opt(
        1024, "streaming: activations above this size (MiB) are read back from disk"
    )
    in_memory: bool = _opt(
        False, "load the whole model even for a safetensors folder with --pipeline sequential"
    )

    label: ClassVar[str] = "recipe"

    def __post_init__(self) -> None:
        super().__post_init__()
        # Method config fields are identifiers: `--option no-such-key=1` means no_such_key.
        self.option = {key.replace("-", "_"): value for key, value in self.option.items()}
        if self.recover < 0:
            raise ConfigError(f"recipe: 'recover' must be >= 0, got {self.recover}")
        # Zero windows or zero-token windows would fail deep in calibration with an
        # empty-tensor error; say which option is wrong instead.
        for name in ("samples", "seq_len", "recover_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"recipe: {name!r} ({flag}) must be at least 1, got {value}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CompressRecipe:
        """Read a recipe file: JSON, or YAML (``.yaml``/``.yml``, needs PyYAML).

        Example:
            >>> recipe = CompressRecipe.from_file("runs/out/recipe.json")  # doctest: +SKIP
        """
        p = Path(path)
        if not p.is_file():
            raise RankcutError(f"path does not exist: {path}")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml  # optional dependency

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except ImportError as err:
            raise RankcutError("YAML recipes need PyYAML (pip install pyyaml)") from err
        except Exception as err:
            raise RankcutError(f"cannot parse recipe {path}: {err}") from err
        if not isinstance(data, dict):
            raise RankcutError(f"recipe {path} must hold an object of options")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{err} (in {path})") from err

    def to_json(self) -> str:
        """The recipe as indented JSON text, as ``recipe.json`` holds it."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_file(self, path: str | os.PathLike) -> Path:
        """Write the recipe as JSON, or YAML for a ``.yaml``/``.yml`` path (needs PyYAML).

        Example:
            >>> CompressRecipe(ratio=0.3).to_file("recipe.yaml")  # doctest: +SKIP
        """
        p = Path(path)
        if p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise RankcutError("YAML recipes need PyYAML (pip install pyyaml)") from err
            p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            p.write_text(self.to_json())
        return p

    # ------------------------------------------------------------------ what it means

    @property
    def allocation_given(self) -> bool:
        """Whether the allocation was chosen (``None`` means the default)."""
        return self.allocation is not None

    def output_dir(self) -> Path:
        """``out``, or ``runs/MODEL-METHOD-RATIO`` when it is not set.

        Example:
            >>> CompressRecipe(method="svd", ratio=0.3).output_dir().as_posix()
            'runs/smollm2-135m-svd-0.3'
        """
        return Path(self.out or f"runs/{Path(str(self.model)).stem}-{self.method}-{self.ratio}")

    def method_config(self):
        """The method's config (``rankcut.methods.get_method(method).config_cls``) from
        the shared fields plus ``option``; unknown ``option`` keys name the valid ones.

        Example:
            >>> CompressRecipe(method="svd", ratio=0.3).method_config().ratio
            0.3
        """
        from .methods import get_method

        spec = get_method(self.method)
        names = {f.name for f in dataclasses.fields(spec.config_cls)} - set(CONFIG_FIELDS)
        unknown = sorted(set(self.option) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s) for {spec.name}: {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(names)) or 'none'}"
            )
        shared = {name: getattr(self, name) for name in CONFIG_FIELDS}
        shared["allocation"] = self.allocation or DEFAULT_ALLOCATION
        return spec.config_cls(**shared, **self.option)

    def recovery_data(self) -> dict:
        """The ``rankcut.data.recovery.recovery_windows`` arguments of these fields.

        Example:
            >>> CompressRecipe(recover=100, recover_windows=10).recovery_data()["count"]
            10
        """
        return {
            "steps": self.recover,
            "seq_len": self.recover_seq_len or RECOVERY_SEQ_LEN,  # None: not resolved yet
            "seed": self.seed,
            "count": self.recover_windows,
        }

    def recovery_config(self):
        """The ``rankcut.finetune.RecoveryConfig`` of the ``recover*`` fields.

        Example:
            >>> CompressRecipe(recover=100, recover_lr=1e-3).recovery_config().lr
            0.001
        """
        from .finetune import RecoveryConfig

        return RecoveryConfig(
            steps=self.recover,
            lr=self.recover_lr,
            distill=self.distill,
            lora_rank=self.recover_lora,
        )


_DESCRIPTIONS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list of strings",
    dict: "an object of KEY: VALUE",
}


@dataclass
class FinetuneOptions(Options):
    """The options of a recovery fine-tune of a saved folder (``rankcut finetune``).

    Example:
        >>> FinetuneOptions(steps=50, data="shakespeare").train_seq_len
        256
    """

    steps: int = _opt(RECOVERY_STEPS, "optimizer steps, one window each")
    lr: float = _opt(1e-4, "peak learning rate")
    lora: int = _opt(
        0,
        "train a rank-R LoRA (peft) on the factors, merged at the end (default 0: the factors)",
        metavar="R",
        show_default=False,
    )
    distill: float = _opt(
        1.0, "share of distillation from the source model in the loss (0 = CE only)"
    )
    data: str = _opt("auto", _DATA_HELP.format("compress --calib", "source"))
    windows: int | None = _opt(None, _WINDOWS_HELP, metavar="N")
    train_seq_len: int = _opt(RECOVERY_SEQ_LEN, "tokens per training window")
    eval_seq_len: int = _opt(512, "evaluation window length", flag="--seq-len", metavar="SEQ_LEN")
    seed: int = _opt(0, "seed for window sampling")
    eval_data: str = _opt(
        "shakespeare-heldout", "held-out text for before/after perplexity ('' to skip)"
    )
    eval_tokens: int = _opt(4096, "tokens of held-out text to score")
    device: str | None = _opt(None, "default: cuda when available", choices=DEVICES)

    label: ClassVar[str] = "finetune"

    def recovery_data(self) -> dict:
        """The ``rankcut.data.recovery.recovery_windows`` arguments of these options.

        Example:
            >>> FinetuneOptions(steps=50).recovery_data()["steps"]
            50
        """
        return {
            "steps": self.steps,
            "seq_len": self.train_seq_len,
            "seed": self.seed,
            "count": self.windows,
        }

    def recovery_config(self):
        """The ``rankcut.finetune.RecoveryConfig`` of these options.

        Example:
            >>> FinetuneOptions(steps=50, lora=4).recovery_config().lora_rank
            4
        """
        from .finetune import RecoveryConfig

        return RecoveryConfig(
            steps=self.steps, lr=self.lr, distill=self.distill, lora_rank=self.lora
        )


@functools.cache
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, bool]]:
    # Cached: every recipe checks itself, and resolving the hints is the slow part.
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}


def _kind(hint: Any) -> tuple[type, bool]:
    """``(kind, optional)`` of a field's type hint, e.g. ``list[str] | None`` ->
    ``(list, True)``."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    optional = type(None) in args
    (inner,) = [a for a in args if a is not type(None)]
    return typing.get_origin(inner) or inner, optional


def _is_kind(value: Any, kind: type) -> bool:
    # bool is an int subclass, but `samples: true` is a mistake, not 1.
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    if kind is list:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if kind is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, kind)


def _underscored(data: Mapping[str, Any]) -> dict[str, Any]:
    return {str(key).replace("-", "_"): value for key, value in data.items()}
