"""Recovery fine-tuning: train only the factors of the factorized layers for a bounded
number of steps.

The loss mixes next-token cross-entropy on calibration text with knowledge distillation
from the dense model (KL divergence to its next-token distribution); distillation
recovers the dense model's behaviour rather than fitting the calibration domain.
Everything except the factors stays frozen. What a layer trains, and what a LoRA adapter
may wrap, each layer says itself (``FactorizedLinear.trainable_parameters`` and
``adapter_targets``): this module never asks a layer's type.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data.distill import DistillWindows, sparse_kl
from .errors import ConfigError, RankcutError
from .layers import FactorizedLinear, factorized_modules
from .models.structure import model_device

logger = logging.getLogger(__name__)


@dataclass
class RecoveryConfig:
    """Options of the recovery fine-tune.

    Attributes:
        steps: optimizer steps (one window per step).
        lr: peak learning rate of AdamW (cosine decay after a linear warm-up).
        warmup: warm-up steps.
        weight_decay: AdamW weight decay.
        distill: mix of the two losses, ``(1 - distill) * CE + distill * T^2 * KL``: 1 =
            pure distillation from the teacher (the default: recovers the dense model's
            behaviour without fitting the calibration domain), 0 = cross-entropy only.
        temperature: distillation temperature.
        grad_clip: gradient-norm clipping.
        checkpointing: gradient checkpointing (less memory, more time).
        lora_rank: 0 trains the factors themselves; ``r > 0`` trains a rank-``r`` LoRA
            (through peft) on each layer's adapter targets (a ``LowRankLinear``'s two
            factors) and merges it in at the end, so the saved structure and parameter
            count do not change. Layers without adapter targets (the structured ones,
            whose factors are plain parameters) then train their factors directly, as
            with 0; a model where no layer has adapter targets is an error.
        lora_alpha: LoRA scaling numerator (default ``2 * lora_rank``).
    """

    steps: int = 200
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    distill: float = 1.0
    temperature: float = 1.0
    grad_clip: float = 1.0
    checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.distill <= 1.0 or self.temperature <= 0:
            raise ConfigError("distill must be in [0, 1] and temperature > 0")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _factorized_layers(model: nn.Module) -> list[tuple[str, FactorizedLinear]]:
    layers = factorized_modules(model)
    if not layers:
        raise RankcutError("the model has no factorized layers to fine-tune")
    return layers


def trainable_factors(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the factorized layers' trainable parameters; return those.

    Raises ``RankcutError`` (and leaves the model as it was) when it has no factorized
    layers.

    Example:
        >>> from torch import nn
        >>> from rankcut.layers import LowRankLinear
        >>> model = nn.Sequential(nn.Linear(4, 4), LowRankLinear(4, 4, rank=1))
        >>> [tuple(p.shape) for p in trainable_factors(model)]
        [(1, 4), (4, 1), (4,)]
        >>> model[0].weight.requires_grad
        False
    """
    layers = _factorized_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for _, layer in layers for p in layer.trainable_parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _lora_plan(
    model: nn.Module, config: RecoveryConfig
) -> tuple[list[str], list[FactorizedLinear]]:
    """``(names, bare)``: the modules LoRA wraps, by qualified name, and the layers that
    have no adapter targets (they train their factors directly beside the adapters).

    Raises ``RankcutError`` without peft, or when no layer has adapter targets: LoRA
    would train nothing (and peft would fail with an error about its target matching).
    """
    if importlib.util.find_spec("peft") is None:  # optional: imported by _add_lora only
        raise RankcutError("LoRA recovery needs peft (pip install 'rankcut[lora]')")
    layers = _factorized_layers(model)
    names = [f"{n}.{rel}" for n, layer in layers for rel in layer.adapter_targets()]
    bare = [layer for _, layer in layers if not layer.adapter_targets()]
    if not names:
        types = ", ".join(sorted({type(layer).__name__ for layer in bare}))
        raise RankcutError(
            f"LoRA recovery (lora_rank={config.lora_rank}) needs layers with adapter "
            f"targets, and {types} layers have none (no sub-module for LoRA to wrap): "
            "use lora_rank=0 to train the factors directly"
        )
    if bare:
        logger.info(
            "LoRA on %d factors; %d layers without adapter targets train their factors directly",
            len(names),
            len(bare),
        )
    return names, bare


def _add_lora(
    model: nn.Module, config: RecoveryConfig, names: list[str], bare: list[FactorizedLinear]
) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on ``names``; returns the peft model, in
    which the adapters and the trainable parameters of ``bare`` require gradients."""
    from peft import LoraConfig, get_peft_model  # checked by _lora_plan

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha or 2 * config.lora_rank,
        lora_dropout=0.0,
        target_modules=names,
        bias="none",
    )
    net = get_peft_model(model, lora)  # freezes all but the adapters
    for p in (p for layer in bare for p in layer.trainable_parameters()):
        p.requires_grad_(True)
    return net


def _lr_factor(step: int, config: RecoveryConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _loss(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logits: Tensor | tuple[Tensor, Tensor] | None,
    config: RecoveryConfig,
) -> Tensor:
    logits = student_logits[:, :-1].float()
    distill = config.distill if teacher_logits is not None else 0.0
    loss = 0.0
    if distill < 1:  # the cross-entropy costs a vocabulary-wide pass: only when it counts
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss = (1 - distill) * ce
    if distill == 0:
        return loss
    if isinstance(teacher_logits, tuple):  # the teacher's top-k, taken when sampling
        return loss + distill * sparse_kl(logits, *teacher_logits)
    t = config.temperature
    teacher = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    student = F.log_softmax(logits / t, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()  # per-token KL(teacher || student)
    return loss + distill * (t * t) * kl


def recover(
    model: nn.Module,
    windows: Tensor | DistillWindows,
    config: RecoveryConfig | None = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune the factors of ``model`` in place on ``windows``.

    Windows are cycled in order. Distillation takes its targets from ``windows`` when
    they are ``DistillWindows`` (the teacher's top-k, stored when the data was made; no
    ``teacher`` is needed then), else from ``teacher`` (the dense model) when given;
    plain ``(n, seq_len)`` token ids without a teacher train on cross-entropy alone.

    Returns:
        ``{"losses": [...], "seconds": ..., "config": {...}}``.

    Example:
        >>> stats = recover(compressed, train_windows, RecoveryConfig(steps=100))  # doctest: +SKIP
    """
    config = config or RecoveryConfig()
    targets = windows if isinstance(windows, DistillWindows) else None
    if targets is not None and config.distill > 0 and config.temperature != 1.0:
        raise ConfigError(
            "stored distillation targets are at temperature 1; use --distill 0 or T=1"
        )
    ids_all = targets.ids if targets is not None else windows
    # Checked before anything changes: a model that cannot be trained is left untouched.
    lora = _lora_plan(model, config) if config.lora_rank else None
    flags = {p: p.requires_grad for p in model.parameters()}
    params = trainable_factors(model)
    device = model_device(model)
    net = model
    if lora is not None:
        net = _add_lora(model, config, *lora).to(device)
        params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    if config.checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    net.train()
    losses: list[float] = []
    finished = False
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="recovery", disable=not progress)
    try:
        for step in bar:
            row = step % ids_all.shape[0]
            ids = ids_all[row][None].to(device)
            mask = torch.ones_like(ids)
            teacher_logits = None
            if targets is not None and config.distill > 0:
                teacher_logits = (
                    targets.top_logprobs[row][None].to(device),
                    targets.top_ids[row][None].to(device),
                )
            elif teacher is not None and config.distill > 0:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
            logits = net(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = _loss(logits, ids, teacher_logits, config)
            if not torch.isfinite(loss):
                raise RankcutError(f"recovery loss became non-finite at step {step}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        finished = True
    finally:
        if net is not model:
            # Fold the adapters into the factors (same shapes); drop them after a failure.
            net.merge_and_unload() if finished else net.unload()
        model.eval()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        if config.checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
    return {"losses": losses, "seconds": time.perf_counter() - start, "config": config.to_dict()}
