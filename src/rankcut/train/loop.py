"""The training loop behind ``rankcut train``: one plain loop for every method.

``train(TrainConfig(...))`` loads the text, makes (or loads) the tokenizer and the model,
and then runs the method's interface (``rankcut.train.methods``) and nothing else::

    method = train_method(name); method.check(setup); method.prepare(model, setup)
    opt = method.optimizer(model, setup); hooks = method.hooks(model, setup)
    for step in range(steps):
        loss = method.loss(model, ids, step) + sum(hook.penalty(model) for hook in hooks)
        loss.backward(); hook.on_backward(model, step) for each hook
        opt.step(); opt.zero_grad(); hook.on_step(model, step) for each hook
    method.finalize(model, setup); rankcut.save(model, out, tokenizer, extra=summary)

Data: ``data`` is cut into consecutive windows of ``seq_len`` tokens, visited in a
seeded random order, epoch after epoch; the batch of a step depends on the seed and the
step only. Validation windows come from ``eval_data``, or (for the built-in
``shakespeare``) from the held-out works, or from the end of ``data`` (cut off as text
before anything is tokenized or trained on it): they are never trained on.

Checkpoints (``OUT/.checkpoint``, written atomically every ``checkpoint_every`` steps)
hold the model, the optimizer state, the random generators, the data position, the
method's state and the history; ``resume=True`` rebuilds the model, calls ``prepare``
again (deterministic from the seed) and loads all of it, so that a killed run ends with
the same weights (bitwise on CPU) as one that was never interrupted. Safetensors and
JSON only: never pickle.

Example:
    >>> from rankcut.train.loop import TrainConfig, train
    >>> result = train(TrainConfig(data="shakespeare", method="dense", steps=200,
    ...                            out="runs/train-tiny-dense"))  # doctest: +SKIP
    >>> result.summary["validation"][-1]["perplexity"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, RankcutError
from ..models.structure import model_device

logger = logging.getLogger(__name__)

#: Where the checkpoint of a run writing ``OUT`` lives (removed when ``OUT`` is saved).
CHECKPOINT_DIR = ".checkpoint"
CHECKPOINT_VERSION = 1
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"

#: Built-in corpora whose validation text is a disjoint built-in split.
HELDOUT_SPLITS = {"shakespeare": "shakespeare-heldout"}

#: Classes (``module.qualname``) whose instances may sit in an optimizer's state and are
#: checkpointed as their attribute dictionaries (tensors in safetensors, the rest JSON)
#: and rebuilt on resume. GaLore keeps a projector object per matrix.
CHECKPOINT_CLASSES = {
    "galore_torch.galore_projector.GaLoreProjector",
    "galore_torch.galore_projector_tensor.GaLoreProjectorTensor",
}

#: The learning-rate schedules (``schedule``); cosine decays to ``MIN_LR_FACTOR`` x lr.
SCHEDULES = ("cosine", "constant")
MIN_LR_FACTOR = 0.1

#: Fields of ``TrainConfig`` that may differ between a run and its resumption.
_RESUME_FREE = ("resume", "overwrite", "device", "out", "eval_every", "checkpoint_every")


def _scratch_lr(method: str) -> float:
    """The default peak learning rate of ``method`` from scratch (dense training's for
    an unknown name, which ``train`` refuses before anything loads)."""
    from .methods import TRAIN_METHODS, TrainMethod

    return float(TRAIN_METHODS.get(method, TrainMethod).scratch_lr)


@dataclass
class TrainConfig:
    """Options of a training run (the flags of ``rankcut train``).

    Attributes:
        data: training text: a built-in corpus name, a ``.txt`` file or a folder of them.
        eval_data: validation text; default: the held-out split of a built-in corpus
            (``shakespeare`` -> ``shakespeare-heldout``), else the last ``eval_fraction``
            of ``data``, cut off before anything is trained on it.
        model: start from this pretrained model (anything ``rankcut.load`` takes), with
            its tokenizer; ``None``: from scratch (``arch``).
        arch: from-scratch architecture: ``tiny`` (default), ``micro`` or a config JSON.
        method: training method (``rankcut.train.methods.TRAIN_METHODS``).
        rank: the method's rank (GaLore: its projection rank).
        param_ratio: the factorized methods' budget: this fraction of the dense targets'
            parameters, in (0, 1].
        steps: optimizer steps.
        batch: windows per step.
        seq_len: tokens per window.
        lr: peak learning rate; default from scratch the method's ``scratch_lr`` (1e-3;
            ``sltrain`` 3e-3, the authors'), 5e-5 from a pretrained model.
        seed: seeds the initial weights, the method's randomness and the data order.
        out: output folder (``None``: nothing is written, the model is returned).
        options: ``KEY=VALUE`` method options (values as strings).
        eval_every: validation perplexity every this many steps (0: only at the start
            and at the end).
        eval_tokens: validation tokens scored each time (at most; the text may be shorter).
        eval_fraction: share of ``data`` held out when no validation text is given.
        checkpoint_every: checkpoint every this many steps (0: never).
        warmup: linear warm-up steps (default: 5% of the steps, at most 100).
        schedule: ``cosine`` (to 10% of ``lr``) or ``constant`` after the warm-up.
        grad_clip: clip the gradient norm to this (0: off).
        vocab_size: size of the from-scratch tokenizer's vocabulary (at most).
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        resume: continue the run whose checkpoint is in ``out``.
        overwrite: replace a non-empty ``out``.

    Example:
        >>> TrainConfig(data="shakespeare", method="lrt", param_ratio=0.5).arch
        'tiny'
        >>> TrainConfig(data="shakespeare", param_ratio=1.5)
        Traceback (most recent call last):
        ...
        rankcut.errors.ConfigError: --param-ratio must be in (0, 1], got 1.5
    """

    data: str
    eval_data: str | None = None
    model: str | None = None
    arch: str | None = None
    method: str = "dense"
    rank: int | None = None
    param_ratio: float | None = None
    steps: int = 200
    batch: int = 8
    seq_len: int = 128
    lr: float | None = None
    seed: int = 0
    out: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    eval_every: int = 50
    eval_tokens: int = 16384
    eval_fraction: float = 0.1
    checkpoint_every: int = 50
    warmup: int | None = None
    schedule: str = "cosine"
    grad_clip: float = 1.0
    vocab_size: int = 8192
    device: str | None = None
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError("--data is required (a corpus name, a .txt file or a folder)")
        if self.model is not None and self.arch is not None:
            raise ConfigError(
                "give --model (a pretrained model) or --arch (from scratch), not both"
            )
        if self.model is None and self.arch is None:
            self.arch = "tiny"
        for name in ("steps", "batch", "seq_len", "eval_tokens", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {self.seq_len}")
        for name in ("eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{_flag(name)} must be an integer >= 0, got {value!r}")
        if self.warmup is not None and (not isinstance(self.warmup, int) or self.warmup < 0):
            raise ConfigError(f"--warmup must be an integer >= 0, got {self.warmup!r}")
        if self.rank is not None and self.param_ratio is not None:
            raise ConfigError("give --rank or --param-ratio, not both")
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1
        ):
            raise ConfigError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.param_ratio is not None:
            ratio = self.param_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise ConfigError(f"--param-ratio must be a number, got {ratio!r}")
            if not 0.0 < float(ratio) <= 1.0:
                raise ConfigError(f"--param-ratio must be in (0, 1], got {ratio}")
            self.param_ratio = float(ratio)
        if self.lr is None:
            self.lr = _scratch_lr(self.method) if self.model is None else 5e-5
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr!r}")
        self.lr = float(self.lr)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval fraction must be in (0, 1), got {self.eval_fraction}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0):
            raise ConfigError(f"--grad-clip must be a number >= 0, got {self.grad_clip!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out; it cannot be --overwrite too")
        if self.resume and not self.out:
            raise ConfigError("--resume needs --out (the folder of the run to continue)")
        self.options = {str(k): str(v) for k, v in (self.options or {}).items()}

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dictionary."""
        return dataclasses.asdict(self)

    def run_fields(self) -> dict[str, Any]:
        """The options that decide the result (a resumed run must repeat them)."""
        return {k: v for k, v in self.to_dict().items() if k not in _RESUME_FREE}

    @property
    def warmup_steps(self) -> int:
        """``warmup``, or its default: 5% of the steps, at most 100."""
        return self.warmup if self.warmup is not None else min(100, self.steps // 20)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainResult:
    """What ``train`` did.

    Attributes:
        model: the trained (and finalized) model.
        tokenizer: its tokenizer.
        out: the folder it was saved to (``None`` when ``config.out`` was ``None``).
        summary: the training summary (also ``rankcut.json``'s ``training`` entry).
        stopped: ``True`` when ``stop_after`` ended the run early (at a checkpoint).
    """

    model: nn.Module
    tokenizer: Any
    out: Path | None
    summary: dict[str, Any]
    stopped: bool = False

    def lines(self) -> list[str]:
        """The summary as the lines ``rankcut train`` prints."""
        return format_summary(self.summary)


# ---------------------------------------------------------------- data


@dataclass
class TrainData:
    """Token windows to train and to validate on.

    Attributes:
        train: ``(n, seq_len)`` training windows (consecutive in the text).
        eval: ``(m, seq_len)`` validation windows (never trained on).
        prefix_len: positions at the start of each window that are context only (a BOS
            prefix of a pretrained tokenizer that adds one; 0 for the trained tokenizer).
        eval_source: where the validation text came from, in words.
        train_tokens: tokens of the training text.
        fingerprint: a digest of the training windows (a resumed run checks it).
    """

    train: Tensor
    eval: Tensor
    prefix_len: int
    eval_source: str
    train_tokens: int
    fingerprint: str


def split_heldout(text: str, fraction: float) -> tuple[str, str]:
    """``(train, heldout)``: the last ``fraction`` of ``text``, cut at a line end, held out.

    Example:
        >>> split_heldout("a\\nb\\nc\\nd\\n", 0.25)
        ('a\\nb\\nc\\n', 'd\\n')
    """
    cut = int(len(text) * (1.0 - fraction))
    line = text.rfind("\n", 0, cut)
    if line > 0:
        cut = line + 1
    return text[:cut], text[cut:]


def windows(ids: list[int], seq_len: int, prefix: list[int], limit: int | None = None) -> Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens (``prefix`` + text).

    Example:
        >>> windows(list(range(7)), 3, []).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    body = seq_len - len(prefix)
    if body < 1:
        raise ConfigError(f"--seq-len {seq_len} leaves no room after the BOS prefix")
    n = len(ids) // body
    if limit is not None:
        n = min(n, limit)
    rows = [prefix + ids[i * body : (i + 1) * body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long).reshape(n, seq_len)


def load_texts(config: TrainConfig) -> tuple[str, str, str]:
    """``(train_text, eval_text, eval_source)`` for ``config``; one-line errors.

    Example:
        >>> load_texts(TrainConfig(data="shakespeare"))[2]  # doctest: +SKIP
        'shakespeare-heldout'
    """
    from ..data import load_text

    text = load_text(config.data)
    if not text.strip():
        raise RankcutError(f"the training text {config.data!r} is empty")
    eval_spec = config.eval_data or HELDOUT_SPLITS.get(config.data)
    if eval_spec is not None:
        if Path(eval_spec).expanduser().resolve() == Path(config.data).expanduser().resolve():
            raise ConfigError("--eval-data is the training text: validation must be held out")
        eval_text = load_text(eval_spec)
        if not eval_text.strip():
            raise RankcutError(f"the validation text {eval_spec!r} is empty")
        return text, eval_text, eval_spec
    train_text, eval_text = split_heldout(text, config.eval_fraction)
    if not eval_text.strip() or not train_text.strip():
        raise RankcutError(
            f"the training text {config.data!r} is too short to hold out "
            f"{config.eval_fraction:.0%} of it for validation (give --eval-data)"
        )
    return train_text, eval_text, f"the last {config.eval_fraction:.0%} of {config.data}"


def make_data(
    config: TrainConfig, tokenizer, train_text: str, eval_text: str, eval_source: str
) -> TrainData:
    """Tokenize both texts into windows; a one-line error when either is too short."""
    from ..data import bos_prefix, tokenize

    prefix = bos_prefix(tokenizer)
    ids = tokenize(train_text, tokenizer)
    train = windows(ids, config.seq_len, prefix)
    if train.shape[0] < 1:
        raise RankcutError(
            f"the training text is too short: {len(ids)} tokens, need at least "
            f"--seq-len {config.seq_len} (one window)"
        )
    body = config.seq_len - len(prefix)
    eval_ids = tokenize(eval_text, tokenizer, max_tokens=max(config.eval_tokens, body))
    held = windows(eval_ids, config.seq_len, prefix)
    if held.shape[0] < 1:
        raise RankcutError(
            f"the validation text ({eval_source}) is too short: {len(eval_ids)} tokens, "
            f"need at least --seq-len {config.seq_len} (one window)"
        )
    digest = hashlib.sha256(train.numpy().tobytes()).hexdigest()[:16]
    return TrainData(train, held, len(prefix), eval_source, len(ids), digest)


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Indices of the training windows of ``step``: a seeded random order per epoch.

    Position ``p = step * batch + i`` is window ``perm(epoch)[p % n]`` of epoch
    ``p // n``: the batch depends on the seed and the step only, so a resumed run
    continues exactly where the checkpoint left off.

    Example:
        >>> sorted(batch_indices(0, 4, 4, seed=0))
        [0, 1, 2, 3]
    """
    out = []
    perms: dict[int, list[int]] = {}
    for p in range(step * batch, (step + 1) * batch):
        epoch = p // n
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(perms[epoch][p % n])
    return out


# ---------------------------------------------------------------- measures


def lr_factor(step: int, steps: int, warmup: int, schedule: str = "cosine") -> float:
    """Learning-rate multiplier of (0-based) ``step``: linear warm-up, then cosine or flat.

    Example:
        >>> [round(lr_factor(s, 10, 2), 3) for s in (0, 1, 9)]
        [0.5, 1.0, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or steps <= warmup + 1:
        return 1.0
    progress = (step - warmup) / (steps - warmup - 1)
    return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model: nn.Module, held: Tensor, batch: int, prefix_len: int = 0) -> float:
    """Mean next-token negative log-likelihood over ``held`` windows (float32), the
    protocol of ``rankcut.evaluate.perplexity`` (each window scored alone, a BOS
    prefix never predicted), in batches.

    Example:
        >>> validation_loss(model, data.eval, 8)  # doctest: +SKIP
        3.91
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    start = max(prefix_len - 1, 0)
    nll, count = 0.0, 0
    try:
        for i in range(0, held.shape[0], batch):
            ids = held[i : i + batch].to(device)
            logits = model(input_ids=ids).logits[:, start:-1].float()
            target = ids[:, start + 1 :]
            nll += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
            )
            count += target.numel()
    finally:
        model.train(was_training)
    if not math.isfinite(nll):
        raise RankcutError("the validation loss is not finite: training diverged (lower --lr)")
    return nll / count


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _tensor_bytes(vars(obj), seen)  # e.g. a GaLore projector's matrix
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (moments, projectors; not the weights).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(4, 4))
        >>> opt = torch.optim.AdamW([p])
        >>> p.grad = torch.ones(4, 4); opt.step()
        >>> optimizer_state_bytes(opt)  # two 4x4 float32 moments and a float32 step
        132
    """
    return _tensor_bytes(list(optimizer.state.values()), set())


def target_params(model: nn.Module, names: list[str]) -> int:
    """Parameters stored by the modules ``names`` (a factorized layer's ``num_params()``,
    index storage included; a dense linear's weight and bias)."""
    total = 0
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        count = getattr(module, "num_params", None)
        total += count() if callable(count) else sum(p.numel() for p in module.parameters())
    return total


def _reset_peak_rss() -> bool:
    """Reset the peak resident set size to the current one (Linux); ``False`` if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """Peak resident set size in bytes (since the last reset where supported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- checkpoints


def pack(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """A JSON-able form of ``obj`` with its tensors moved into ``tensors`` (by key).

    Dictionaries keep their key types (optimizer states are keyed by integers), tuples
    stay tuples; objects of ``CHECKPOINT_CLASSES`` are kept as their attributes.
    Anything else is refused: a checkpoint is data, never pickled code.

    Example:
        >>> tensors = {}
        >>> pack({0: (1.5, torch.zeros(2))}, tensors)
        {'__dict__': [[0, {'__tuple__': [1.5, {'__tensor__': 't0'}]}]]}
    """
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        t = obj.detach().cpu()
        tensors[key] = _own(t)
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[pack(k, tensors), pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if name in CHECKPOINT_CLASSES:
        return {"__object__": name, "attributes": pack(vars(obj), tensors)}
    raise RankcutError(f"cannot checkpoint a {name} in the training state")


def _own(t: Tensor) -> Tensor:
    """``t`` contiguous and owning its whole storage (safetensors refuses views)."""
    t = t.contiguous()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def unpack(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of ``pack``.

    Example:
        >>> tensors = {}
        >>> unpack(pack({0: (1.5, "a")}, tensors), tensors)
        {0: (1.5, 'a')}
    """
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dict__" in obj:
        return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__dict__"]}
    if "__tuple__" in obj:
        return tuple(unpack(v, tensors) for v in obj["__tuple__"])
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__object__" in obj:
        import importlib

        name = obj["__object__"]
        if name not in CHECKPOINT_CLASSES:
            raise RankcutError(f"checkpoint holds an object of an unknown class {name!r}")
        module, _, qualname = name.rpartition(".")
        cls = getattr(importlib.import_module(module), qualname)
        instance = cls.__new__(cls)
        instance.__dict__.update(unpack(obj["attributes"], tensors))
        return instance
    raise RankcutError(f"checkpoint: unreadable entry {sorted(obj)[:3]}")


def rng_state() -> dict[str, Any]:
    """The states of every random generator a training step may use."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _model_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with each shared tensor once, and ``{dropped: kept}``."""
    state, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() == 0:
            key = (name,)  # empty tensors share no data: never tie them
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu()
        state[name] = _own(t)
    return state, tied


def save_checkpoint(folder: Path, model, optimizer, tokenizer, record: dict[str, Any]) -> None:
    """Write the checkpoint ``folder`` atomically (a temporary sibling, then a rename)."""
    from safetensors.torch import save_file

    from ..io import atomic_dir

    tensors, tied = _model_tensors(model)
    extra: dict[str, Tensor] = {}
    packed = pack({"optimizer": optimizer.state_dict(), "rng": rng_state()}, extra)
    record = {**record, "tied": tied, "packed": packed, "version": CHECKPOINT_VERSION}
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        save_file(extra, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(record) + "\n")


def read_checkpoint_record(folder: Path) -> dict[str, Any]:
    """The JSON record of a checkpoint; a one-line error when there is none."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise RankcutError(
            f"--resume: no checkpoint in {folder.parent} (looked for {folder.name}/{STATE_FILE})"
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RankcutError(f"--resume: cannot read {path}: {err}") from None
    if not isinstance(record, dict) or record.get("version") != CHECKPOINT_VERSION:
        raise RankcutError(f"--resume: {path} is not a rankcut training checkpoint")
    return record


def load_checkpoint(folder: Path, record: dict, model: nn.Module, optimizer) -> None:
    """Load the model and optimizer state and restore the random generators."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / MODEL_FILE))
        extra = load_file(str(folder / TENSORS_FILE))
    except (OSError, RuntimeError) as err:
        raise RankcutError(f"--resume: cannot read the checkpoint in {folder}: {err}") from None
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        first = " ".join(str(err).strip().splitlines()[:2])
        raise RankcutError(f"--resume: the checkpoint does not fit the model: {first}") from None
    missing = sorted(set(result.missing_keys) - set(record.get("tied", {})))
    if missing or result.unexpected_keys:
        raise RankcutError(
            "--resume: the checkpoint does not fit the model "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    state = unpack(record["packed"], extra)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise RankcutError(f"--resume: the optimizer state does not fit: {err}") from None
    # Objects in the state (GaLore's projectors) are not moved by load_state_dict: their
    # tensors go to their parameter's device, as they were when saved.
    for param, entry in optimizer.state.items():
        for value in entry.values():
            if isinstance(value, Tensor) or not hasattr(value, "__dict__"):
                continue
            for key, attr in vars(value).items():
                if isinstance(attr, Tensor):
                    setattr(value, key, attr.to(param.device))
                elif isinstance(attr, list) and all(isinstance(a, Tensor) for a in attr):
                    setattr(value, key, [a.to(param.device) for a in attr])
    set_rng_state(state["rng"])


# ---------------------------------------------------------------- the run


def _check_out(config: TrainConfig) -> tuple[Path | None, dict | None]:
    """``(out, checkpoint record)``: checked before anything is loaded or written."""
    from ..io import check_output_dir, check_writable

    if not config.out:
        return None, None
    out = Path(config.out).expanduser()
    ckpt = out / CHECKPOINT_DIR
    if config.resume:
        record = read_checkpoint_record(ckpt)
        check_writable(out)
        then, now = record.get("config", {}), config.run_fields()
        differ = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        if differ:
            shown = ", ".join(
                f"{_flag(k)} {then.get(k)!r} there, {now.get(k)!r} here" for k in differ[:3]
            )
            raise ConfigError(f"--resume: the checkpoint in {out} is of another run ({shown})")
        return out, record
    if (ckpt / STATE_FILE).is_file() and not config.overwrite:
        raise RankcutError(
            f"output folder {out} holds an unfinished training run: --resume continues it, "
            "--overwrite starts again"
        )
    check_output_dir(out, overwrite=config.overwrite)
    return out, None


def _check_rank(model: nn.Module, targets: list[str], rank: int | None) -> None:
    """A ``ConfigError`` when ``rank`` exceeds the full rank of a targeted matrix."""
    from ..layers import dense_shape, is_dense_linear

    if rank is None:
        return
    for name in targets:
        module = model.get_submodule(name)
        if not is_dense_linear(module):
            continue
        out_f, in_f = dense_shape(module)
        if rank > min(out_f, in_f):
            raise ConfigError(
                f"--rank {rank} is larger than the matrix {name} ({out_f} x {in_f}, full rank "
                f"{min(out_f, in_f)})"
            )


def _build(config: TrainConfig, ckpt: Path | None, train_text: str):
    """``(model, tokenizer, source)``: loaded, or built from scratch (tokenizer trained)."""
    from .. import io
    from .scratch import build_model, train_tokenizer

    if config.resume and ckpt is not None:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    elif config.model is not None:
        tokenizer = io.load_tokenizer(config.model)
    else:
        tokenizer = train_tokenizer(train_text, config.vocab_size)
    if config.model is not None:
        model = io.load(config.model)
        model.rankcut_meta = None  # it was compressed before: the saved entries are ours
        return model, tokenizer, config.model
    return build_model(config.arch, tokenizer, seed=config.seed), tokenizer, f"arch:{config.arch}"


def train(
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    **fields: Any,
) -> TrainResult:
    """Train a model as ``config`` (or the ``TrainConfig`` fields given) says; save it.

    Args:
        config: the run's options; alternatively give ``TrainConfig`` fields as keywords.
        progress: show a progress bar (loss, tokens/s).
        stop_after: stop after this many steps of this call, writing a checkpoint there
            (what a killed run leaves behind; for tests and time-boxed runs).

    Returns:
        A ``TrainResult`` (model, tokenizer, output folder, summary).

    Raises:
        RankcutError: bad input (one line), found before anything is written.

    Example:
        >>> from rankcut.train.loop import train
        >>> result = train(data="shakespeare", method="dense", steps=100,
        ...                out="runs/train-tiny-dense")  # doctest: +SKIP
        >>> print("\\n".join(result.lines()))  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..models.structure import find_targets
    from ..runner import check_seq_len, resolve_device
    from .methods import TrainSetup, train_method

    if config is None:
        config = TrainConfig(**fields)
    elif fields:
        config = dataclasses.replace(config, **fields)
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"stop_after must be >= 1, got {stop_after}")
    wall_start = time.perf_counter()
    method = train_method(config.method)  # an unknown name fails before anything loads
    out, record = _check_out(config)
    ckpt = out / CHECKPOINT_DIR if out is not None else None
    device = torch.device(resolve_device(config.device))
    if config.model is not None:
        check_seq_len(config.model, config.seq_len, "--seq-len")

    train_text, eval_text, eval_source = load_texts(config)
    model, tokenizer, source = _build(config, ckpt, train_text)
    check_seq_len(model, config.seq_len, "--seq-len")
    data = make_data(config, tokenizer, train_text, eval_text, eval_source)
    del train_text, eval_text
    if record is not None and record.get("data", {}).get("fingerprint") != data.fingerprint:
        raise RankcutError(
            "--resume: the training text is not the one the checkpoint was trained on"
        )

    targets = list(find_targets(model))
    _check_rank(model, targets, config.rank)
    dense_targets = target_params(model, targets)
    dense_total = sum(p.numel() for p in model.parameters())
    setup = TrainSetup(
        targets=targets,
        rank=config.rank,
        param_ratio=config.param_ratio,
        options=dict(config.options),
        steps=config.steps,
        seed=config.seed,
        lr=config.lr,
    )
    method.check(setup)
    model.to(device)
    torch.manual_seed(config.seed)  # the method's own randomness derives from the seed
    method.prepare(model, setup)
    model.to(device)
    model.train()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # training never decodes
    optimizer = method.optimizer(model, setup)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    hooks = method.hooks(model, setup)
    trained_targets = target_params(model, targets)
    trainable = [p for p in model.parameters() if p.requires_grad]

    history: dict[str, Any] = {"loss": [], "validation": [], "resumed_at": []}
    clock = {"train_s": 0.0, "eval_s": 0.0, "wall_s": 0.0}
    start = 0
    if record is not None:
        load_checkpoint(ckpt, record, model, optimizer)
        method.load_state_dict(record.get("method", {}))
        start = record["step"]
        history = record["history"]
        history["resumed_at"].append(start)
        clock = record["clock"]
        logger.info("resumed %s at step %d of %d", out, start, config.steps)

    def evaluate(step: int) -> None:
        t0 = time.perf_counter()
        loss = validation_loss(model, data.eval, config.batch, data.prefix_len)
        clock["eval_s"] += time.perf_counter() - t0
        history["validation"].append({"step": step, "loss": loss, "perplexity": math.exp(loss)})
        logger.info("step %d: validation perplexity %.3f", step, math.exp(loss))

    def checkpoint(step: int) -> None:
        clock["wall_s"] += time.perf_counter() - run_start[0]
        run_start[0] = time.perf_counter()
        save_checkpoint(
            ckpt,
            model,
            optimizer,
            tokenizer,
            {
                "config": config.run_fields(),
                "step": step,
                "data": {
                    "fingerprint": data.fingerprint,
                    "windows": int(data.train.shape[0]),
                    "windows_seen": step * config.batch,
                },
                "method": method.state_dict(),
                "history": history,
                "clock": clock,
            },
        )

    if ckpt is not None and record is None and ckpt.exists():
        import shutil

        # --overwrite: everything was checked; a checkpoint of the old run must not be
        # resumed by mistake if this one is killed before it writes its own.
        shutil.rmtree(ckpt)
    rss_reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_start = [wall_start]
    if start == 0:
        evaluate(0)
    tokens_per_step = config.batch * config.seq_len
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=f"train {config.method}",
        disable=not progress,
        dynamic_ncols=True,
    )
    stopped = False
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            factor = lr_factor(step, config.steps, config.warmup_steps, config.schedule)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            ids = data.train[batch_indices(step, config.batch, data.train.shape[0], config.seed)]
            ids = ids.to(device)
            loss = method.loss(model, ids, step)
            for hook in hooks:
                term = hook.penalty(model)
                if term is not None:
                    loss = loss + term
            loss.backward()
            for hook in hooks:
                hook.on_backward(model, step)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for hook in hooks:
                hook.on_step(model, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RankcutError(
                    f"the training loss is not finite at step {step + 1}: training diverged "
                    "(lower --lr)"
                )
            history["loss"].append(value)
            clock["train_s"] += time.perf_counter() - t0
            done = step + 1
            bar.update(1)
            bar.set_postfix(
                loss=f"{value:.3f}",
                tok_s=f"{done * tokens_per_step / max(clock['train_s'], 1e-9):.0f}",
            )
            if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                evaluate(done)
            last = done == config.steps
            if stop_after is not None and done - start >= stop_after and not last:
                if ckpt is not None:
                    checkpoint(done)
                stopped = True
                break
            if ckpt is not None and config.checkpoint_every and not last:
                if done % config.checkpoint_every == 0:
                    checkpoint(done)
    finally:
        bar.close()
    done = len(history["loss"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
    opt_bytes = optimizer_state_bytes(optimizer)
    if stopped:
        summary = {"method": config.method, "steps_done": done, "stopped": True}
        return TrainResult(model, tokenizer, out, summary, stopped=True)

    evaluate(done)
    before = history["validation"][-1]["perplexity"]
    finalized = method.finalize(model, setup) or {}
    model.to(device)
    after_loss = validation_loss(model, data.eval, config.batch, data.prefix_len)
    final_targets = target_params(model, targets)
    clock["wall_s"] += time.perf_counter() - run_start[0]
    from ..evaluate import param_summary

    params = param_summary(model)
    summary = {
        "method": config.method,
        "source": source,
        "config": config.to_dict(),
        "steps": done,
        "tokens": done * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "train_windows": int(data.train.shape[0]),
        "train_tokens_available": data.train_tokens,
        "epochs": round(done * config.batch / data.train.shape[0], 3),
        "validation_source": data.eval_source,
        "validation_tokens": int(data.eval.shape[0] * (config.seq_len - data.prefix_len)),
        "loss": [round(v, 5) for v in history["loss"]],
        "validation": history["validation"],
        "perplexity_before_finalize": before,
        "perplexity": math.exp(after_loss),
        "finalize": finalized,
        "params": {
            "targets": len(targets),
            "dense_targets": dense_targets,
            "trained_targets": trained_targets,
            "final_targets": final_targets,
            "trained_ratio": trained_targets / dense_targets,
            "final_ratio": final_targets / dense_targets,
            "dense_model": dense_total,
            "model": params["params_total"],
        },
        "optimizer_state_bytes": opt_bytes,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "cuda_allocated"
        if device.type == "cuda"
        else ("rss_during_training" if rss_reset else "rss_process"),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "tokens_per_s": done * tokens_per_step / max(clock["train_s"], 1e-9),
        "train_s": clock["train_s"],
        "eval_s": clock["eval_s"],
        "wall_s": clock["wall_s"],
        "resumed_at": history["resumed_at"],
    }
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True
    model.eval()
    if out is not None:
        from ..io import save

        extra = {
            "training": summary,
            "params": {
                "targeted_before": dense_targets,
                "targeted_after": final_targets,
                "model_before": dense_total,
                "model_after": params["params_total"],
            },
        }
        if config.model is not None:
            extra["source_model"] = config.model
        files = {"train.json": json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"}
        # OUT holds the checkpoint: the save replaces the whole folder atomically.
        save(model, out, tokenizer=tokenizer, overwrite=True, extra=extra, files=files)
    return TrainResult(model, tokenizer, out, summary)


def format_summary(summary: dict[str, Any]) -> list[str]:
    """The lines ``rankcut train`` prints for a run's summary.

    Example:
        >>> format_summary({"method": "dense", "stopped": True, "steps_done": 3})
        ['dense: stopped after 3 steps (checkpoint written)']
    """
    if summary.get("stopped"):
        return [
            f"{summary['method']}: stopped after {summary['steps_done']} steps (checkpoint written)"
        ]
    p = summary["params"]
    lines = [
        f"{summary['method']} ({summary['source']}): {summary['steps']} steps, "
        f"{summary['tokens']:,} tokens, {summary['tokens_per_s']:,.0f} tokens/s, "
        f"{summary['wall_s']:.1f} s",
        f"validation perplexity {summary['perplexity']:.3f} ({summary['validation_source']})"
        + (
            f", {summary['perplexity_before_finalize']:.3f} before finalize"
            if abs(summary["perplexity"] - summary["perplexity_before_finalize"]) > 1e-9
            else ""
        ),
        f"parameters {p['model']:,} (targets {p['final_targets']:,} = "
        f"{p['final_ratio']:.1%} of dense {p['dense_targets']:,})",
        f"peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB "
        f"({summary['peak_memory_kind']}), optimizer state "
        f"{summary['optimizer_state_bytes'] / 2**20:,.1f} MiB",
    ]
    return lines


__all__ = [
    "CHECKPOINT_DIR",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "batch_indices",
    "format_summary",
    "lr_factor",
    "optimizer_state_bytes",
    "split_heldout",
    "train",
    "validation_loss",
]
