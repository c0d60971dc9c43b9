"""Text sampled from the model itself: the one sampling loop, with a key/value cache.

Both users of model-generated text run this loop: calibration windows
(``generated.generated_windows``, token ids only) and recovery windows
(``distill.sample_distill_windows``, ids plus the model's top-k next-token targets, taken
from the very forward passes that sampled the text). Both start every window with the
same tokens (``start_tokens``) and never draw an end-of-text token
(``forbidden_tokens``), so that every window is full-length text.

They differ in one thing, the draw rule (``DRAWS``): calibration draws as transformers'
``generate(do_sample=True, top_k=0)`` did before this loop replaced it, so that the
calibration windows of a seed, and every result measured on them, stay what they were;
recovery draws by inverse CDF, one random number per row instead of one per
vocabulary entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import RankcutError
from ..models.kind import is_causal_lm
from ..models.structure import model_device
from .windows import bos_prefix

T = TypeVar("T")

#: Memory the key/value cache of one sampling batch may take, and the largest batch
#: (on 2 CPU cores SmolLM2-135M samples 19% faster per token at 64 than at 32, and no
#: faster at 128).
SAMPLING_CACHE_BYTES = 2 * 2**30
MAX_SAMPLING_BATCH = 64


def start_tokens(tokenizer) -> list[int]:
    """What a sampled window starts with: the tokenizer's BOS prefix if it adds one,
    else its BOS token, else its EOS token (the document separator of models trained
    without BOS).

    Example:
        >>> class Tok:  # adds no special tokens, has an EOS token only
        ...     bos_token_id, eos_token_id = None, 2
        ...     def __call__(self, text, add_special_tokens):
        ...         return {"input_ids": [5]}
        >>> start_tokens(Tok())
        [2]
    """
    prefix = bos_prefix(tokenizer)
    if prefix:
        return prefix
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [int(token_id)]
    raise RankcutError("the tokenizer has neither a BOS nor an EOS token to start generation")


def forbidden_tokens(model: nn.Module, tokenizer) -> list[int]:
    """End-of-text ids that sampling never draws, so every window is full-length text:
    the model's generation EOS id(s) and the tokenizer's EOS id.

    Example:
        >>> from types import SimpleNamespace
        >>> model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7]))
        >>> forbidden_tokens(model, SimpleNamespace(eos_token_id=2))
        [2, 7]
    """
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def sampling_batch(model: nn.Module, seq_len: int, budget: int = SAMPLING_CACHE_BYTES) -> int:
    """Sequences sampled at once: as many as keep the key/value cache of ``seq_len``
    tokens each within ``budget`` bytes, between 1 and ``MAX_SAMPLING_BATCH``.

    Example:
        >>> sampling_batch(torch.nn.Linear(2, 2), 512)  # no config to size a cache from
        8
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return 8  # an architecture whose cache size cannot be read from its config
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    itemsize = next(model.parameters()).element_size()
    per_sequence = 2 * layers * kv_heads * head_dim * itemsize * seq_len
    return max(1, min(MAX_SAMPLING_BATCH, budget // per_sequence))


def draw_multinomial(
    logits: Tensor, temperature: float, forbidden: Tensor, generator: torch.Generator
) -> Tensor:
    """One token per row of ``logits`` ``(n, vocab)`` exactly as transformers'
    ``generate(do_sample=True, top_k=0, top_p=1.0)`` draws it: float32 scores, the
    ``forbidden`` ids set to -inf (its minimum-length rule), divided by ``temperature``
    unless it is 1, softmax, ``torch.multinomial`` (an exponential race: one random
    number per vocabulary entry). Returns ``(n, 1)`` ids.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> draw_multinomial(torch.tensor([[0.0, 9.0, 0.0]]), 1.0, torch.tensor([1]), g).shape
        torch.Size([1, 1])
    """
    scores = logits.to(dtype=torch.float32, copy=True)  # never write into the model's output
    forbidden = forbidden[forbidden < scores.shape[1]]  # ids the model's head lacks
    if forbidden.numel():
        scores[:, forbidden] = float("-inf")
    if temperature != 1.0:
        scores = scores / temperature
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def draw_inverse_cdf(
    logits: Tensor, temperature: float, forbidden: Tensor, generator: torch.Generator
) -> Tensor:
    """One token per row of ``logits`` ``(n, vocab)`` from softmax(logits / temperature),
    never a ``forbidden`` id: inverse-CDF sampling in float64, one uniform number per row
    (drawing a random number per vocabulary entry, as an exponential race does, costs ten
    times more for a large vocabulary). Returns ``(n, 1)`` ids.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> draw_inverse_cdf(torch.tensor([[0.0, 9.0, 0.0]]), 1.0, torch.tensor([1]), g).shape
        torch.Size([1, 1])
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    forbidden = forbidden[forbidden < probs.shape[1]]  # ids the model's head lacks
    if forbidden.numel():
        probs[:, forbidden] = 0.0
    cdf = probs.cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    # the first index whose cumulative mass exceeds u: token i with probability p_i
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(cdf.shape[1] - 1)


#: The draw rules ``sample`` knows: ``multinomial`` keeps the calibration windows of a
#: seed what ``generate`` made them, ``inverse-cdf`` is cheaper per token.
DRAWS: dict[str, Callable[[Tensor, float, Tensor, torch.Generator], Tensor]] = {
    "multinomial": draw_multinomial,
    "inverse-cdf": draw_inverse_cdf,
}


def _multinomial_is_exponential(rows: int, vocab: int, device: torch.device) -> bool:
    """Whether ``torch.multinomial`` (one sample per row) consumes its generator as
    ``exponential_`` on a tensor of the probabilities' shape ``(rows, vocab)`` does (its
    Gumbel-max fast path): checked, not assumed of the torch version."""
    scores = torch.linspace(0, 1, rows * vocab, device=device).reshape(rows, vocab)
    probs = torch.softmax(scores, -1)
    drawn = torch.Generator(device=device).manual_seed(1)
    replay = torch.Generator(device=device).manual_seed(1)
    torch.multinomial(probs, 1, generator=drawn)
    torch.empty_like(probs).exponential_(1, generator=replay)
    return torch.equal(drawn.get_state(), replay.get_state())


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    temperature: float = 1.0,
    draw: str = "inverse-cdf",
    keep: Callable[[Tensor], T] | None = None,
    desc: str = "sampling",
    progress: bool = True,
) -> list[tuple[Tensor, list[T]]]:
    """``samples`` windows of ``seq_len`` tokens sampled from ``model`` (a causal LM).

    Plain ancestral sampling at ``temperature`` (no top-k/top-p, which would narrow the
    distribution) with a key/value cache, ``batch_size`` sequences at once (default:
    ``sampling_batch``), seeded by a private generator (the global RNG state is left
    untouched); every window begins with ``start_tokens`` and never draws one of
    ``forbidden_tokens``. ``draw`` names the rule of ``DRAWS``. With the multinomial
    draw on the CPU, batches share forward passes where that leaves every window as
    it is (``_Sampler.together``): the windows depend on ``batch_size``, the time less.

    Args:
        keep: called with the logits of every forward pass (the prefill's
            ``(n, len(start), vocab)``, then ``(n, 1, vocab)`` per new token but the
            last), to keep what the caller needs of them (distillation targets).

    Returns:
        One ``(ids, kept)`` per batch: ``(n, seq_len)`` token ids on the CPU and the
        values ``keep`` returned, in order (empty without ``keep``).

    Example:
        >>> batches = sample(model, tokenizer, 16, 512, draw="multinomial")  # doctest: +SKIP
        >>> ids = torch.cat([ids for ids, _ in batches])  # doctest: +SKIP
    """
    if not is_causal_lm(model):
        raise RankcutError(f"sampling needs a causal LM; {type(model).__name__} cannot generate")
    if samples < 1 or seq_len < 2 or temperature <= 0:
        raise RankcutError(
            f"need samples >= 1, seq-len >= 2 and temperature > 0; got "
            f"{samples}, {seq_len}, {temperature}"
        )
    if draw not in DRAWS:
        raise RankcutError(f"unknown draw rule {draw!r}; known: {', '.join(DRAWS)}")
    start = start_tokens(tokenizer)
    if len(start) >= seq_len:
        raise RankcutError(f"seq-len {seq_len} leaves no room after the start tokens {start}")
    batch_size = batch_size or sampling_batch(model, seq_len)
    device = model_device(model)
    forbidden = torch.tensor(forbidden_tokens(model, tokenizer), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    run = _Sampler(model, DRAWS[draw], temperature, forbidden, generator, keep)
    sizes = [min(batch_size, samples - first) for first in range(0, samples, batch_size)]
    # Batches that may share one forward pass (``_Sampler.together``): as many as the
    # key/value cache budget holds, for the multinomial draw without ``keep`` only.
    per_run = 1
    if draw == "multinomial" and keep is None and device.type == "cpu":
        per_run = max(1, sampling_batch(model, seq_len) // batch_size)
    was_training = model.training
    model.eval()
    batches = []
    try:
        with tqdm(
            total=samples * seq_len, desc=desc, unit="tok", unit_scale=True, disable=not progress
        ) as bar:
            for i in range(0, len(sizes), per_run):
                group = sizes[i : i + per_run]
                if len(group) > 1 and run.batch_invariant(start, group):
                    batches.extend(run.together(start, group, seq_len, bar))
                else:
                    batches.extend(run.batch(start, n, seq_len, bar) for n in group)
    finally:
        model.train(was_training)
    return batches


class _Sampler:
    """The state one ``sample`` call shares across its batches (one generator for all).

    Batches are drawn one after another from the one generator, so a batch's windows
    depend on the batch size. ``together`` samples several batches in one forward pass
    per token, each batch with a generator of its own set to the state it would have
    had (``_skip`` replays the draws of the batches before it without a model), so
    that the windows are those of ``batch``, batch after batch, at fewer forward passes
    (SmolLM2-135M on one thread of a shared 2-core machine: a cached step took about
    1.3 times as long at 16 sequences as at 8).
    It is used only where ``batch_invariant`` finds a row's logits the same, bit for
    bit, in the larger batch as in its own.
    """

    def __init__(self, model, draw, temperature, forbidden, generator, keep) -> None:
        self.model, self.draw, self.temperature = model, draw, temperature
        self.forbidden, self.generator, self.keep = forbidden, generator, keep
        # transformers 5 renamed the cache argument (``past_key_values`` warns, and goes)
        params = inspect.signature(model.forward).parameters
        self.cache = "cache" if "cache" in params else "past_key_values"
        self._invariant: dict[tuple[int, ...], bool] = {}

    def _step(self, ids: Tensor, out=None):
        cache = {} if out is None else {self.cache: getattr(out, self.cache)}
        return self.model(input_ids=ids, use_cache=True, **cache)

    def batch_invariant(self, start: list[int], sizes: list[int]) -> bool:
        """Whether the batches ``sizes`` may share forward passes without changing a
        draw: the multinomial draw consumes the generator as an ``exponential_`` of the
        logits' shape (the replay ``_skip`` relies on), and the prefill and a cached
        step give every row the same logits, bit for bit, in the shared batch as in its
        own (batched kernels may sum in another order for another batch size)."""
        key = tuple(sizes)
        if key in self._invariant:
            return self._invariant[key]
        device = self.forbidden.device
        ids = torch.tensor([start] * sum(sizes), device=device)
        together = self._step(ids)
        vocab = together.logits.shape[-1]
        nxt = torch.full((sum(sizes), 1), start[-1], device=device)
        together_next = self._step(nxt, together).logits
        same = self.draw is draw_multinomial and all(
            _multinomial_is_exponential(n, vocab, device) for n in set(sizes)
        )
        first = 0
        for n in sizes:
            if not same:
                break
            alone = self._step(ids[first : first + n])
            alone_next = self._step(nxt[first : first + n], alone).logits
            same = torch.equal(alone.logits, together.logits[first : first + n]) and (
                torch.equal(alone_next, together_next[first : first + n])
            )
            first += n
        self._invariant[key] = same
        return same

    def _skip(self, state: Tensor, n: int, steps: int, vocab: int) -> Tensor:
        """The generator state after a batch of ``n`` rows drew ``steps`` tokens from
        ``state``: the same ``exponential_`` calls as ``torch.multinomial`` makes."""
        device = self.forbidden.device
        replay = torch.Generator(device=device)
        replay.set_state(state)
        noise = torch.empty((n, vocab), dtype=torch.float32, device=device)
        for _ in range(steps):
            noise.exponential_(1, generator=replay)
        return replay.get_state()

    def together(self, start: list[int], sizes: list[int], seq_len: int, bar) -> list:
        """The batches ``sizes`` as ``batch`` samples them one after another, in one
        forward pass per token (see the class docstring)."""
        device = self.forbidden.device
        total = sum(sizes)
        ids = torch.tensor([start] * total, device=device)
        out = self._step(ids)
        bar.update(total * len(start))
        steps = seq_len - len(start)
        vocab = out.logits.shape[-1]
        generators, state = [], self.generator.get_state()
        for i, n in enumerate(sizes):
            generator = torch.Generator(device=device)
            generator.set_state(state)
            generators.append(generator)
            if i < len(sizes) - 1:  # the last batch's own draws move the state on
                state = self._skip(state, n, steps, vocab)
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        tokens = [ids.cpu()]
        for position in range(len(start), seq_len):
            last = out.logits[:, -1]
            nxt = torch.cat(
                [
                    self.draw(last[lo:hi], self.temperature, self.forbidden, generator)
                    for lo, hi, generator in zip(bounds[:-1], bounds[1:], generators, strict=True)
                ]
            )
            tokens.append(nxt.cpu())
            bar.update(total)
            if position < seq_len - 1:
                out = self._step(nxt, out)
        self.generator.set_state(generators[-1].get_state())
        rows = torch.cat(tokens, 1)
        return [(rows[lo:hi], []) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def batch(self, start: list[int], n: int, seq_len: int, bar) -> tuple[Tensor, list]:
        """``n`` windows: a prefill of the start tokens, then one cached forward pass per
        new token; the progress ``bar`` counts tokens."""
        ids = torch.tensor([start] * n, device=self.forbidden.device)
        out = self.model(input_ids=ids, use_cache=True)
        tokens = [ids.cpu()]
        bar.update(n * len(start))
        kept = []
        for position in range(len(start), seq_len):
            logits = out.logits
            if self.keep is not None:
                kept.append(self.keep(logits))
            nxt = self.draw(logits[:, -1], self.temperature, self.forbidden, self.generator)
            tokens.append(nxt.cpu())
            bar.update(n)
            if position < seq_len - 1:
                cache = {self.cache: getattr(out, self.cache)}
                out = self.model(input_ids=nxt, use_cache=True, **cache)
        return torch.cat(tokens, 1), kept
