"""Method configs and the registry that maps each config type to its handler.

Adding a method means one new module in ``rankcut/methods`` with a config dataclass
and a ``@register_method`` factorize function; ``api.compress`` never changes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..calibrate import LayerStats
from ..errors import ConfigError

#: Measured on a 2-core CPU with SmolLM2-135M's shapes (benchmarks/rank_multiples.py).
DEFAULT_RANK_MULTIPLE = 8
DEFAULT_MIN_SPEEDUP = 1.1
#: Ridge of the sequential refit towards the dense weight (``refit_damp``).
DEFAULT_REFIT_DAMP = 0.01
#: Calibration tokens of the allocation's output-Fisher backward (``fisher_tokens``).
DEFAULT_FISHER_TOKENS = 4096


@dataclass
class MethodConfig:
    """Options shared by every factorization method.

    Attributes:
        ratio: fraction of the targeted matrices' parameters to remove, in (0, 1).
        targets: regexes over module names to factorize; ``None`` = every dense linear
            inside the decoder layers (embeddings and LM head excluded).
        exclude: regexes removing modules from the targets.
        rank_pattern: per-module rank overrides, ``{regex: rank}`` (first match wins).
        allocation: rank allocator name (see ``rankcut.rank.ALLOCATORS``); the budget is
            global: ``ratio`` of all targeted parameters, not of each matrix.
        min_rank_fraction: non-uniform allocators never go below this fraction of a
            matrix's uniform rank.
        allocation_options: allocator knobs (``beta_min`` for heavy-tail, ``candidates``
            and ``samples`` for sensitivity).
        pipeline: ``whole`` (statistics from the dense model in one pass),
            ``sequential`` (decoder layer by decoder layer, statistics from the
            already-compressed prefix) or ``auto`` (the default: sequential when
            calibration data is given and the targets lie in decoder blocks, else whole).
        refit: with ``sequential`` (ignored by ``whole``), fit each factorization to the
            *dense* model's outputs from the compressed inputs (closed-form least squares
            ``W_ls = W C^T G'^-1``, then the method factorizes ``W_ls``; with ``svd-llm``
            this is the exact reduced-rank regression). ``False`` only takes the
            statistics from the compressed prefix.
        refit_damp: ridge of the refit towards the dense weight, ``lam = refit_damp *
            mean(diag X'^T X')``: ``W_ls^T = (G' + lam I)^-1 (C W^T + lam W^T)``. Without
            it the least squares is unbounded in directions the calibration inputs
            barely span (GPTQ dampens its Hessian by 1% of the mean diagonal for the
            same reason). ``0`` = the plain least squares.
        rank_multiple: ranks (from any allocator) are rounded down to a multiple of this
            when at least 4 multiples, and the budget refilled in such steps; ``1``
            turns it off. Default measured in ``benchmarks/results/rank_multiples.md``.
        min_speedup: a matrix stays dense unless its rank cuts its multiply-adds by at
            least this factor (near ``mn / (m + n)`` two thin products are slower than
            one dense product); ``1.0`` only requires saving parameters.
        fisher_tokens: when the pipeline gathers its own statistics block by block
            (``sequential``), the whole-model pass that only feeds the allocation takes
            its Gram matrices on every calibration window but the output Fisher (the
            loss weights of the global allocation's scores, a backward through the
            whole model) on the first windows holding this many tokens; ``0`` = every
            window. The ``whole`` pipeline and loss-table allocations use every window.
            Default measured in ``benchmarks/results/compress_time.md``.
        compute_dtype: the precision of the model's large linear products while it runs
            over the calibration windows (statistics passes, the sequential pipeline's
            block runs): ``float32`` exact; ``bfloat16`` rounds each product's inputs to
            bfloat16 and keeps its output, every statistic, decomposition and saved
            factor in float32/float64 (``rankcut.calibrate.precision``); ``auto`` (the
            default) takes ``bfloat16`` where the device multiplies it at least 1.5x
            faster (AMX / AVX512-BF16 CPUs, GPUs), else ``float32``. Speed and
            perplexity of each measured in ``benchmarks/results/compress_time.md``.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    #: Method-specific fields that must be strictly positive numbers.
    positive_fields: ClassVar[tuple[str, ...]] = ()

    ratio: float = 0.2
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    allocation: str = "global"
    min_rank_fraction: float = 0.25
    allocation_options: dict[str, Any] = field(default_factory=dict)
    pipeline: str = "auto"
    refit: bool = True
    refit_damp: float = DEFAULT_REFIT_DAMP
    rank_multiple: int = DEFAULT_RANK_MULTIPLE
    min_speedup: float = DEFAULT_MIN_SPEEDUP
    fisher_tokens: int = DEFAULT_FISHER_TOKENS
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ConfigError(f"ratio must be a number, got {self.ratio!r}")
        if not 0.0 < float(self.ratio) < 1.0:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}")
        self.ratio = float(self.ratio)
        for pattern in [*(self.targets or []), *self.exclude, *self.rank_pattern]:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"invalid regex {pattern!r}: {err}") from err
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank < 0:
                raise ConfigError(f"rank_pattern[{pattern!r}] must be an int >= 0, got {rank!r}")
        from ..rank import ALLOCATORS

        if self.allocation not in ALLOCATORS:
            known = ", ".join(sorted(ALLOCATORS))
            raise ConfigError(f"unknown allocation {self.allocation!r}; known: {known}")
        if not isinstance(self.allocation_options, dict):
            raise ConfigError(
                f"allocation_options must be an object, got {self.allocation_options!r}"
            )
        ALLOCATORS[self.allocation].check_options(self.allocation_options)
        if not 0.0 <= self.min_rank_fraction <= 1.0:
            raise ConfigError(f"min_rank_fraction must be in [0, 1], got {self.min_rank_fraction}")
        for name in self.positive_fields:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int):
            raise ConfigError(f"rank_multiple must be an integer, got {self.rank_multiple!r}")
        if self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple must be >= 1, got {self.rank_multiple}")
        if isinstance(self.min_speedup, bool) or not isinstance(self.min_speedup, (int, float)):
            raise ConfigError(f"min_speedup must be a number, got {self.min_speedup!r}")
        if not 1.0 <= self.min_speedup < 10.0:
            raise ConfigError(f"min_speedup must be in [1, 10), got {self.min_speedup}")
        self.min_speedup = float(self.min_speedup)
        damp = self.refit_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
            raise ConfigError(f"refit_damp must be a number >= 0, got {damp!r}")
        self.refit_damp = float(damp)
        tokens = self.fisher_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ConfigError(f"fisher_tokens must be an integer >= 0, got {tokens!r}")
        from ..calibrate.precision import COMPUTE_DTYPES

        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )
        if not isinstance(self.refit, bool):
            raise ConfigError(f"refit must be true or false, got {self.refit!r}")
        from ..pipelines import config_pipelines

        if self.pipeline not in config_pipelines():
            raise ConfigError(
                f"pipeline must be one of {config_pipelines()}, got {self.pipeline!r}"
            )

    def spec(self) -> MethodSpec:
        """The registered method this config belongs to (its math and its needs).

        Orchestration (``rankcut.pipelines``) reaches the method through this, so it
        never imports the method registry: methods sit below the pipelines that run them.
        """
        return spec_for_config(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including the method name and config version."""
        return {"method": self.method, "version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        data = dict(data)
        method = data.pop("method", cls.method)
        version = data.pop("version", cls.version)
        config_cls = get_method(method).config_cls if cls is MethodConfig else cls
        if version > config_cls.version:
            raise ConfigError(
                f"{method} config version {version} is newer than this rankcut supports "
                f"({config_cls.version})"
            )
        names = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {method} config keys: {', '.join(unknown)}")
        return config_cls(**data)


Factorize = Callable[[Tensor, LayerStats, int, MethodConfig, str], tuple[Tensor, Tensor]]
#: ``build(weight, stats, rank, config, name, bias) -> layer`` (float64 layer module).
Build = Callable[[Tensor, LayerStats, int, MethodConfig, str, Tensor | None], nn.Module]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config type, what it needs from calibration, its math.

    Low-rank methods have ``factorize`` (two factors, held by a ``LowRankLinear``);
    structured methods have ``build`` instead, returning any layer registered in
    ``rankcut.layers.LAYER_TYPES`` with ``@register_layer`` (a ``FactorizedLinear``:
    ``structure()``/``from_structure()``, ``num_params()``, ``macs()``, ``weight_product()``,
    ``to_linear()``, ``adapter_targets()``). For them the ``rank`` an
    allocator gives is a parameter budget of ``rank (out + in)``.
    """

    name: str
    config_cls: type[MethodConfig]
    factorize: Factorize | None
    needs: frozenset[str]
    summary: str
    build: Build | None = None

    def make_layer(self, weight, stats, rank, config, name, bias=None, dtype=None) -> nn.Module:
        """The replacement layer for ``weight`` (float64 ``(out, in)``), cast to ``dtype``."""
        from ..layers import LowRankLinear

        if self.build is None:
            up, down = self.factorize(weight, stats, rank, config, name)
            return LowRankLinear.from_factors(up, down, bias, dtype=dtype)
        layer = self.build(weight, stats, rank, config, name, bias)
        return layer.to(dtype) if dtype is not None else layer

    def approximate(self, weight, stats, rank, config, name) -> Tensor:
        """The dense ``(out, in)`` approximation ``W'`` the method makes of ``weight``."""
        if self.build is None:
            up, down = self.factorize(weight, stats, rank, config, name)
            return up @ down
        return self.build(weight, stats, rank, config, name, None).weight_product()


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, config_cls: type[MethodConfig], needs: tuple[str, ...] = (), summary: str = ""
) -> Callable[[Factorize], Factorize]:
    """Register ``factorize(weight, stats, rank, config, module_name) -> (up, down)``.

    ``weight`` is the float64 ``(out, in)`` matrix; ``needs`` names the statistics to
    collect (``gram``, ``abs_mean``, ``fisher``).
    """

    def wrap(fn: Factorize) -> Factorize:
        config_cls.method = name
        METHODS[name] = MethodSpec(name, config_cls, fn, frozenset(needs), summary)
        return fn

    return wrap


def register_structure(
    name: str, config_cls: type[MethodConfig], needs: tuple[str, ...] = (), summary: str = ""
) -> Callable[[Build], Build]:
    """Register ``build(weight, stats, rank, config, module_name, bias) -> layer``.

    For methods whose result is not one low-rank product (see ``rankcut.layers``):
    ``rank`` is the parameter budget ``rank (out + in)`` the layer may store.
    """

    def wrap(fn: Build) -> Build:
        config_cls.method = name
        METHODS[name] = MethodSpec(name, config_cls, None, frozenset(needs), summary, build=fn)
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def spec_for_config(config: MethodConfig) -> MethodSpec:
    for spec in METHODS.values():
        if type(config) is spec.config_cls:
            return spec
    raise ConfigError(f"no method registered for {type(config).__name__}")
