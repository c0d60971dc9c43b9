"""Inference speed and memory of (factorized) causal LMs, measured honestly.

- *Prefill*: one forward over ``batch x prompt`` tokens (with the KV cache built, as in
  generation); tokens/s = ``batch * prompt / seconds``.
- *Decode*: greedy steps of one token per sequence reusing ``past_key_values`` after a
  prefill (the prefill is not timed); tokens/s = ``batch * new_tokens / seconds``.
- *Linears only*: the decoder-block linears (factorized or dense) called one after the
  other on random inputs of the decode shape ``(batch, 1, in)`` and the prefill shape
  ``(batch, prompt, in)``: what factorization can change, without attention, norms,
  embeddings and the LM head.
- *Theoretical*: multiply-adds of the linears' forward on the decode batch and on the
  prefill batch, each layer's own count (``FactorizedLinear.macs``: a rank-``r`` layer
  ``m x n`` does ``r (m + n)`` per token instead of ``m n``; a Kronecker layer that
  rebuilds its weight for a large batch counts that rebuild).

A model and its baseline are timed alternately (model, baseline, model, ...) in the
same process and the medians are compared, so that drifts of a shared machine hit both.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU (Linux) the process's
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each run),
reported as the growth over the resident set before the run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..layers import FactorizedLinear, dense_shape, factorized_modules, is_dense_linear
from ..models.structure import find_decoder_layers, model_device


@dataclass
class SpeedSettings:
    """What to run: ``batch`` sequences, ``prompt`` tokens of prefill, ``new_tokens`` decoded."""

    batch: int = 1
    prompt: int = 512
    new_tokens: int = 128
    repeats: int = 5
    warmup: int = 1
    linear_repeats: int = 9
    threads: int | None = None
    seed: int = 0


@dataclass
class SpeedReport:
    """Medians of one model's runs (seconds, tokens/s, bytes) and their raw samples."""

    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    linears_prefill_seconds: float
    linears_decode_seconds: float
    peak_memory_bytes: int | None
    param_bytes: int
    params: int
    samples: dict[str, list[float]] = field(default_factory=dict)


# ---------------------------------------------------------------- arithmetic


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linears inside the decoder blocks, factorized or dense, by name (execution order)."""
    out: dict[str, nn.Module] = {}
    for block_name, block in find_decoder_layers(model):
        factorized = []
        for name, module in block.named_modules():
            full = f"{block_name}.{name}"
            if any(full.startswith(f + ".") for f in factorized):
                continue
            if isinstance(module, FactorizedLinear):
                factorized.append(full)
                out[full] = module
            elif is_dense_linear(module):
                out[full] = module
    return out


def module_macs(module: nn.Module, tokens: int = 1) -> tuple[int, int]:
    """``(macs_now, macs_dense)`` of one linear's forward on ``tokens`` tokens.

    A factorized layer counts itself (``FactorizedLinear.macs``); a dense one does
    ``tokens m n``. Bias adds are left out of both.

    Example:
        >>> from rankcut.layers import LowRankLinear
        >>> module_macs(LowRankLinear(8, 8, 2))
        (32, 64)
        >>> module_macs(LowRankLinear(8, 8, 2), tokens=4)
        (128, 256)
    """
    if is_dense_linear(module):
        m, n = dense_shape(module)
        return tokens * m * n, tokens * m * n
    return module.macs(tokens), tokens * module.out_features * module.in_features


def theoretical_speedup(model: nn.Module, tokens: int = 1) -> dict[str, float | int]:
    """Speedups that multiply-adds allow (dense / now) for a forward on ``tokens`` tokens.

    ``linears``: the decoder-block linears; ``model``: all linears including the LM head
    (attention scores, norms and embeddings lookups are left out; they are the same in
    both models). The ``*_macs_per_token`` counts are the forward's multiply-adds
    divided by ``tokens`` (exact integers at ``tokens=1``; a layer whose cost is not
    linear in the batch, such as a Kronecker layer rebuilding its weight, makes them
    fractional).

    Example:
        >>> from torch import nn
        >>> from rankcut.layers import LowRankLinear
        >>> theoretical_speedup(nn.Sequential(LowRankLinear(8, 8, 2)))["model"]
        2.0
    """
    dec = decoder_linears(model)
    now = dense = 0
    for module in dec.values():
        a, b = module_macs(module, tokens)
        now, dense = now + a, dense + b
    # Linears outside the blocks (LM head, poolers): usually dense, the same in both
    # models; one factorized there still counts its own cost against its dense one.
    factor_parents = [n for n, _ in factorized_modules(model)]
    others = others_dense = 0
    for name, module in model.named_modules():
        outside = name not in dec and not any(name.startswith(f + ".") for f in factor_parents)
        if outside and (is_dense_linear(module) or isinstance(module, FactorizedLinear)):
            a, b = module_macs(module, tokens)
            others, others_dense = others + a, others_dense + b
    return {
        "tokens": tokens,
        "linears_macs_per_token": _per_token(now, tokens),
        "linears_dense_macs_per_token": _per_token(dense, tokens),
        "other_linear_macs_per_token": _per_token(others, tokens),
        "linears": dense / max(now, 1),
        "model": (dense + others_dense) / max(now + others, 1),
    }


def _per_token(macs: int, tokens: int) -> int | float:
    return macs // tokens if macs % tokens == 0 else macs / tokens


def param_bytes(model: nn.Module) -> tuple[int, int]:
    """``(parameters, bytes)`` counting each shared tensor once."""
    seen, count, size = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        count += p.numel()
        size += p.numel() * p.element_size()
    return count, size


# ---------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory over a ``with`` block: CUDA allocator peak, or CPU resident-set growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
                self._resettable = True
            except OSError:
                self._resettable = False
            self._base = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            hwm = self._status("VmHWM")
            if self._resettable and hwm is not None and self._base is not None:
                self.peak = max(hwm - self._base, 0)


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def _prefill(model: nn.Module, ids: torch.Tensor):
    return model(input_ids=ids, use_cache=True)


@torch.no_grad()
def _prefill_and_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int):
    """``(prefill_seconds, decode_seconds)``: the prompt, then ``new_tokens`` greedy steps
    that reuse its KV cache (one token per sequence per step)."""
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    out = _prefill(model, ids)
    _sync(device)
    prefill = time.perf_counter() - start
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, time.perf_counter() - start


def _in_features(module: nn.Module) -> int:
    return dense_shape(module)[1] if is_dense_linear(module) else module.in_features


def _linear_inputs(model: nn.Module, batch: int, tokens: int, seed: int):
    """``(module, input)`` per decoder linear; inputs ``(batch, tokens, in)`` shared by size."""
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    cache: dict[int, torch.Tensor] = {}
    calls = []
    for module in decoder_linears(model).values():
        n = _in_features(module)
        if n not in cache:
            cache[n] = torch.randn(batch, tokens, n, generator=gen).to(device, dtype)
        calls.append((module, cache[n]))
    return calls


@torch.no_grad()
def _run_linears(calls, device: torch.device) -> float:
    """Seconds to call every decoder linear once, in order (as a forward pass would)."""

    def run():
        for module, x in calls:
            module(x)

    return _timed(run, device)


def measure(
    models: dict[str, nn.Module],
    settings: SpeedSettings | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
) -> dict[str, SpeedReport]:
    """Time each model in ``models`` alternately and return medians per model.

    Args:
        models: ``{label: causal LM}``, all on the same device (e.g. the compressed
            model and its dense baseline).
        settings: batch, prompt length, decoded tokens, repeats, threads.
        vocab_size: token ids are drawn below this (default: the first model's config).
        progress: show a progress bar over the repeats.

    Example:
        >>> reports = measure({"model": m, "dense": d}, SpeedSettings(prompt=64))  # doctest: +SKIP
        >>> reports["model"].decode_tokens_per_s  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    s = settings or SpeedSettings()
    if s.threads:
        torch.set_num_threads(s.threads)
    first = next(iter(models.values()))
    device = model_device(first)
    vocab = vocab_size or int(getattr(first.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, vocab, (s.batch, s.prompt), generator=gen).to(device)
    for model in models.values():
        model.eval()
    lin_decode = {k: _linear_inputs(m, s.batch, 1, s.seed) for k, m in models.items()}
    lin_prefill = {k: _linear_inputs(m, s.batch, s.prompt, s.seed) for k, m in models.items()}
    samples = {
        k: {"prefill": [], "decode": [], "lin_prefill": [], "lin_decode": []} for k in models
    }
    peaks: dict[str, list[int]] = {k: [] for k in models}

    for model in models.values():  # warm-up: allocator, kernels, caches
        for _ in range(s.warmup):
            _prefill_and_decode(model, ids, min(4, s.new_tokens))
    for _ in tqdm(range(s.repeats), desc="speed", disable=not progress, leave=False):
        for key, model in models.items():
            with PeakMemory(device) as mem:
                prefill, decode = _prefill_and_decode(model, ids, s.new_tokens)
            samples[key]["prefill"].append(prefill)
            samples[key]["decode"].append(decode)
            if mem.peak is not None:
                peaks[key].append(mem.peak)
    for _ in range(s.linear_repeats):
        for key in models:
            samples[key]["lin_decode"].append(_run_linears(lin_decode[key], device))
            samples[key]["lin_prefill"].append(_run_linears(lin_prefill[key], device))

    reports = {}
    for key, model in models.items():
        med = {k: statistics.median(v) for k, v in samples[key].items()}
        count, size = param_bytes(model)
        reports[key] = SpeedReport(
            prefill_seconds=med["prefill"],
            decode_seconds=med["decode"],
            prefill_tokens_per_s=s.batch * s.prompt / med["prefill"],
            decode_tokens_per_s=s.batch * s.new_tokens / med["decode"],
            linears_prefill_seconds=med["lin_prefill"],
            linears_decode_seconds=med["lin_decode"],
            peak_memory_bytes=max(peaks[key]) if peaks[key] else None,
            param_bytes=size,
            params=count,
            samples=samples[key],
        )
    return reports


def compare(
    model: nn.Module,
    baseline: nn.Module | None = None,
    settings: SpeedSettings | None = None,
    progress: bool = True,
) -> dict:
    """Measure ``model`` (and ``baseline``, alternately) and put ratios beside theory.

    Returns a JSON-ready dict: ``settings``, ``model`` and ``baseline`` reports (as
    dicts), ``theoretical`` and ``theoretical_prefill`` (from multiply-adds, see
    ``theoretical_speedup``, for the ``batch`` tokens of a decode step and the
    ``batch * prompt`` tokens of the prefill) and, with a baseline, ``measured`` speedups (baseline seconds / model seconds, medians) for
    ``prefill``, ``decode``, ``linears_prefill`` and ``linears_decode``, and
    ``measured_best`` (the same from each model's fastest run).
    """
    s = settings or SpeedSettings()
    models = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    reports = measure(models, s, progress=progress)
    out = {
        "settings": asdict(s),
        "threads": torch.get_num_threads(),
        "device": str(model_device(model)),
        "theoretical": theoretical_speedup(model, tokens=s.batch),
        "theoretical_prefill": theoretical_speedup(model, tokens=s.batch * s.prompt),
        "model": asdict(reports["model"]),
    }
    if baseline is not None:
        a, b = reports["model"], reports["baseline"]
        out["baseline"] = asdict(b)
        out["measured"] = {
            "prefill": b.prefill_seconds / a.prefill_seconds,
            "decode": b.decode_seconds / a.decode_seconds,
            "linears_prefill": b.linears_prefill_seconds / a.linears_prefill_seconds,
            "linears_decode": b.linears_decode_seconds / a.linears_decode_seconds,
        }
        # Ratio of the fastest runs: less sensitive to other jobs on a shared machine.
        keys = {"prefill": "prefill", "decode": "decode"}
        keys.update(linears_prefill="lin_prefill", linears_decode="lin_decode")
        out["measured_best"] = {k: min(b.samples[v]) / min(a.samples[v]) for k, v in keys.items()}
    return out


def format_comparison(result: dict) -> str:
    """A plain-text table of ``compare``'s result."""
    s = result["settings"]
    m = result["model"]
    b = result.get("baseline")
    th = result["theoretical"]
    # Results written before the prefill theory existed: one per-token ratio for both.
    th_prefill = result.get("theoretical_prefill", th)
    lines = [
        f"batch {s['batch']}, prompt {s['prompt']}, new tokens {s['new_tokens']}, "
        f"{s['repeats']} alternating repeats (medians), device {result['device']}, "
        f"{result['threads']} threads",
        f"{'':24}{'model':>14}" + (f"{'baseline':>14}{'measured x':>12}" if b else ""),
    ]

    def row(label, key, fmt, ratio=None):
        text = f"{label:24}{fmt(m[key]):>14}"
        if b:
            text += f"{fmt(b[key]):>14}" + (f"{ratio:>12.3f}" if ratio is not None else "")
        lines.append(text)

    meas = result.get("measured", {})
    row("prefill tokens/s", "prefill_tokens_per_s", lambda v: f"{v:,.1f}", meas.get("prefill"))
    row("decode tokens/s", "decode_tokens_per_s", lambda v: f"{v:,.2f}", meas.get("decode"))
    row(
        "linears prefill ms",
        "linears_prefill_seconds",
        lambda v: f"{1e3 * v:,.2f}",
        meas.get("linears_prefill"),
    )
    row(
        "linears decode ms",
        "linears_decode_seconds",
        lambda v: f"{1e3 * v:,.3f}",
        meas.get("linears_decode"),
    )
    row(
        "peak memory MiB",
        "peak_memory_bytes",
        lambda v: "n/a" if v is None else f"{v / 2**20:,.1f}",
    )
    row("parameter MiB", "param_bytes", lambda v: f"{v / 2**20:,.1f}")
    lines.append(
        f"theoretical speedup (multiply-adds): decoder linears prefill "
        f"{th_prefill['linears']:.3f}x, decode {th['linears']:.3f}x; all linears incl. "
        f"LM head prefill {th_prefill['model']:.3f}x, decode {th['model']:.3f}x"
    )
    if b:
        best = result["measured_best"]
        prefill, decode = th_prefill["linears"], th["linears"]
        lines.append(
            "measured / theoretical (decoder linears): prefill "
            f"{meas['linears_prefill'] / prefill:.2f}, decode "
            f"{meas['linears_decode'] / decode:.2f} (fastest runs: "
            f"{best['linears_prefill'] / prefill:.2f}, "
            f"{best['linears_decode'] / decode:.2f})"
        )
    return "\n".join(lines)
