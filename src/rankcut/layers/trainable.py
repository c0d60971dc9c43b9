"""Layers for training low rank from the start: LRT, SLTrain and Maestro.

- **LRT** (low-rank transformer): a plain ``LowRankLinear`` whose factors are drawn so
  that their product has the variance of a dense initialisation
  (``lowrank_from_scratch``); no dense weight ever exists.
- **SLTrain**: ``SLTrainLinear``, ``W = (alpha / r) B A + S`` where ``S`` has a fixed,
  uniformly random support chosen once from a seed; only the values of ``S`` train.
- **Maestro**: ``MaestroLinear``, an ordered low-rank ``U V`` whose leading components
  matter most (trained with ordered dropout and a hierarchical group lasso, see
  ``rankcut.train.regularizers``); it runs at a rank prefix when ``active_rank`` is set
  and cuts to a plain ``LowRankLinear`` at any rank (``truncate``).

All three keep the ``FactorizedLinear`` contract, so ``rankcut.save`` / ``rankcut.load``
round-trip them (safetensors + ``rankcut.json``) like the post-training layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register_layer
from .linear import dense_weight
from .lowrank import LowRankLinear
from .structured import StructuredLinear, index_dtype


def _default_std(in_features: int) -> float:
    """Standard deviation of ``nn.Linear``'s default weight init (Kaiming-uniform with
    ``a = sqrt(5)``, i.e. uniform in ``+-1/sqrt(in)``): ``1 / sqrt(3 in)``."""
    return 1.0 / math.sqrt(3.0 * in_features)


def scratch_factors(
    in_features: int,
    out_features: int,
    rank: int,
    std: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Random ``up`` ``(out, r)`` and ``down`` ``(r, in)`` whose product's entries have
    standard deviation ``std`` (default: that of ``nn.Linear``'s own init).

    Each entry of ``up @ down`` is a sum of ``r`` products of independent normals, with
    variance ``r su^2 sd^2``; both factors get ``su = sd = sqrt(std / sqrt(r))`` (the
    balanced split, as ``split_factors`` gives an SVD).

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> up, down = scratch_factors(512, 512, 64, std=0.02, generator=gen)
        >>> round((up @ down).std().item(), 3)
        0.02
    """
    std = _default_std(in_features) if std is None else float(std)
    scale = math.sqrt(std / math.sqrt(rank))
    dtype = dtype or torch.float32
    up = torch.randn(out_features, rank, generator=generator, dtype=dtype) * scale
    down = torch.randn(rank, in_features, generator=generator, dtype=dtype) * scale
    return up, down


def lowrank_from_scratch(
    in_features: int,
    out_features: int,
    rank: int,
    bias: bool = True,
    std: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LowRankLinear:
    """An LRT layer: a ``LowRankLinear`` initialised for training from scratch.

    The factors come from ``scratch_factors`` (the product has the variance of a dense
    init of standard deviation ``std``); the bias, if any, starts at zero.

    Example:
        >>> layer = lowrank_from_scratch(16, 8, rank=4, bias=False)
        >>> type(layer).__name__, layer.num_params()
        ('LowRankLinear', 96)
    """
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
    up, down = scratch_factors(in_features, out_features, rank, std, generator, dtype)
    layer = LowRankLinear(in_features, out_features, rank, bias, device=device, dtype=dtype)
    with torch.no_grad():
        layer.up.weight.copy_(up)
        layer.down.weight.copy_(down)
        if layer.up.bias is not None:
            layer.up.bias.zero_()
    return layer


def random_support(
    out_features: int, in_features: int, nnz: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``nnz`` distinct positions of an ``(out, in)`` matrix drawn uniformly, as
    ``(rows, cols)`` sorted row-major (SLTrain's fixed support).

    Example:
        >>> rows, cols = random_support(3, 4, 5, torch.Generator().manual_seed(0))
        >>> len(set(zip(rows.tolist(), cols.tolist())))
        5
    """
    if not 0 <= nnz <= out_features * in_features:
        raise ValueError(f"nnz must be in [0, {out_features * in_features}], got {nnz}")
    flat = torch.randperm(out_features * in_features, generator=generator)[:nnz]
    flat = flat.sort().values
    return flat // in_features, flat % in_features


@register_layer
class SLTrainLinear(StructuredLinear):
    """SLTrain's ``y = ((alpha / r) B A + S) x + b``: low rank plus a fixed-support sparse.

    Stored: ``up`` (``B``, ``(out, r)``), ``down`` (``A``, ``(r, in)``), ``values``
    (``(nnz,)``, the entries of ``S``) and the support as CSR index buffers, ``crow``
    ``(out + 1,)`` and ``col`` ``(nnz,)``, in the smallest integer types that hold them
    (index storage, counted in ``num_params`` by its bytes / 4). The support is chosen
    once (``from_scratch``) and never trains: only ``values`` carry gradients for ``S``.
    ``alpha`` is an integer structure field (the authors use 32), so the scale
    ``alpha / r`` is recorded in ``rankcut.json`` and no extra tensor is stored.

    ``forward`` never stores a dense weight; it takes one of three paths (``path_for``):

    - ``gather`` (few tokens, decoding): the factors, then the ``nnz`` input entries
      that ``S`` reads, one multiply-add per entry and token;
    - ``scatter``, once the gathered ``(tokens, nnz)`` products would outgrow a dense
      ``S``: the factors, plus one product with ``S`` scattered into a transient dense
      matrix;
    - ``dense``, once ``tokens > out in / (out + in)``, where building
      ``W = (alpha / r) B A + S`` transiently (``r out in`` multiply-adds) and one
      product with it costs fewer multiply-adds than the factors (as
      ``KroneckerLinear`` rebuilds for large batches).

    Measured on one CPU thread (forward + backward, 256 x 688 at rank 80 and
    ``delta = 0.03``): 1024 tokens took 165 ms gathering, 51 ms scattering and 30 ms
    with the transient ``W``; 64 tokens 9.9, 4.4 and 10.7 ms; one token 1.4, 1.6 and
    6.1 ms.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> layer = SLTrainLinear.from_scratch(16, 8, rank=2, nnz=4, bias=False, generator=gen)
        >>> layer.num_params()  # 2 * (16 + 8) + 4 values + crow 9 x 1 B + col 4 x 1 B
        56
        >>> x = torch.randn(3, 16)
        >>> torch.allclose(layer(x), x @ layer.weight_product().T, atol=1e-6)
        True
    """

    structure_fields = ("nnz", "alpha")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        alpha: int = 32,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        if alpha < 1:
            raise ValueError(f"alpha must be a positive integer, got {alpha}")
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz must be in [0, {in_features * out_features}], got {nnz}")
        self.nnz, self.alpha = int(nnz), int(alpha)
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.down = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.values = nn.Parameter(torch.zeros(nnz, **kw))
        crow_dtype = index_dtype(nnz + 1)
        self.register_buffer("crow", torch.zeros(out_features + 1, dtype=crow_dtype, device=device))
        self.register_buffer("col", torch.zeros(nnz, dtype=index_dtype(in_features), device=device))

    @property
    def scale(self) -> float:
        """``alpha / r``, the factor of the low-rank part."""
        return self.alpha / self.rank

    @staticmethod
    def index_cost(in_features: int, out_features: int, nnz: int) -> int:
        """Index storage of the support, in float32-parameter units, rounded up (what
        ``index_params()`` reports for a layer of these sizes).

        Example:
            >>> SLTrainLinear.index_cost(16, 8, 4)  # crow 9 x 1 B + col 4 x 1 B = 13 B
            4
        """
        crow = (out_features + 1) * torch.empty((), dtype=index_dtype(nnz + 1)).element_size()
        col = nnz * torch.empty((), dtype=index_dtype(in_features)).element_size()
        return math.ceil((crow + col) / 4)

    @classmethod
    def from_scratch(
        cls,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        alpha: int = 32,
        bias: bool = True,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> SLTrainLinear:
        """The authors' initialisation: ``A`` Kaiming-uniform (``+-1/sqrt(in)``), ``B``
        zeros, the support uniform at random, its values uniform in ``+-1/sqrt(in)``,
        the bias zero. Deterministic given ``generator``'s state."""
        layer = cls(in_features, out_features, rank, nnz, alpha, bias, device=device, dtype=dtype)
        rows, cols = random_support(out_features, in_features, nnz, generator)
        bound = 1.0 / math.sqrt(in_features)
        dtype = dtype or torch.float32
        down = torch.empty(rank, in_features, dtype=dtype).uniform_(
            -bound, bound, generator=generator
        )
        values = torch.empty(nnz, dtype=dtype).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            layer.down.copy_(down)
            layer.up.zero_()
            layer.values.copy_(values)
            layer.set_support(rows, cols)
            if layer.bias is not None:
                layer.bias.zero_()
        return layer

    def set_support(self, rows: Tensor, cols: Tensor) -> None:
        """Store the support ``(rows, cols)`` (``nnz`` entries sorted row-major) as CSR."""
        if rows.numel() != self.nnz or cols.numel() != self.nnz:
            raise ValueError(f"the support needs {self.nnz} entries, got {rows.numel()}")
        counts = torch.bincount(rows.long().cpu(), minlength=self.out_features)
        crow = torch.zeros(self.out_features + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(counts, 0)
        with torch.no_grad():
            self.crow.copy_(crow)
            self.col.copy_(cols)

    def support(self) -> tuple[Tensor, Tensor]:
        """``(rows, cols)`` of the stored entries, as ``long`` tensors."""
        counts = self.crow.long().diff()
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=counts.device), counts
        )
        return rows, self.col.long()

    def sparse_dense(self) -> Tensor:
        """``S`` as a dense ``(out, in)`` matrix (differentiable in ``values``)."""
        rows, cols = self.support()
        s = self.values.new_zeros(self.out_features, self.in_features)
        return s.index_put((rows, cols), self.values)

    def path_for(self, tokens: int) -> str:
        """The path ``forward`` takes for ``tokens`` tokens: ``gather`` while
        ``tokens nnz <= out in`` (the gathered products are no larger than a dense
        ``S``), ``dense`` once ``tokens (out + in) > out in`` (the transient ``W`` costs
        fewer multiply-adds than the factors), ``scatter`` in between.

        Example:
            >>> layer = SLTrainLinear(60, 40, rank=3, nnz=240, bias=False)
            >>> [layer.path_for(t) for t in (1, 10, 11, 24, 25)]
            ['gather', 'gather', 'scatter', 'scatter', 'dense']
        """
        size = self.out_features * self.in_features
        if tokens * self.nnz <= size:
            return "gather"
        if tokens * (self.out_features + self.in_features) > size:
            return "dense"
        return "scatter"

    def gathers_for(self, tokens: int) -> bool:
        """Whether ``tokens`` tokens take the gather path (see ``path_for``)."""
        return self.path_for(tokens) == "gather"

    def _forward(self, x: Tensor) -> Tensor:
        path = self.path_for(x.numel() // self.in_features)
        if path == "dense":
            return F.linear(x, self.weight_product())
        # The scale multiplies the small factor A, not the (tokens, out) output.
        y = F.linear(F.linear(x, self.down * self.scale), self.up)
        if not self.nnz:
            return y
        if path == "gather":
            rows, cols = self.support()
            flat = x.reshape(-1, self.in_features)
            products = flat[:, cols] * self.values
            sparse = flat.new_zeros(flat.shape[0], self.out_features).index_add(1, rows, products)
            return y + sparse.reshape(y.shape)
        return y + F.linear(x, self.sparse_dense())

    def macs(self, tokens: int) -> int:
        """Multiply-adds of the path ``forward`` takes (``path_for``): ``tokens r (in +
        out)`` for the factors plus ``tokens nnz`` (gather) or ``tokens out in``
        (scatter); ``r out in`` for building ``W`` plus ``tokens out in`` (dense).

        Example:
            >>> layer = SLTrainLinear(16, 8, rank=2, nnz=4, bias=False)
            >>> layer.macs(1), layer.macs(64)  # 64 (16 + 8) > 16 * 8: builds W
            (52, 8448)
        """
        size = self.in_features * self.out_features
        path = self.path_for(tokens)
        if path == "dense":
            return self.rank * size + tokens * size
        low_rank = self.rank * (self.in_features + self.out_features)
        return tokens * (low_rank + (self.nnz if path == "gather" else size))

    def weight_product(self) -> Tensor:
        """``(alpha / r) B A + S`` (the scale applied to ``A``, the smaller operand of the
        product in ``forward``'s dense path)."""
        w = self.up @ (self.down * self.scale)
        return w + self.sparse_dense() if self.nnz else w


@register_layer
class MaestroLinear(StructuredLinear):
    """Maestro's ordered low-rank layer ``y = U V x + b`` (``U`` ``(out, r)``, ``V`` ``(r, in)``).

    Component ``i`` is column ``i`` of ``U`` and row ``i`` of ``V``; training with
    ordered dropout (a sampled rank prefix, ``active_rank``) and the hierarchical group
    lasso (``group_lasso``) orders them by importance, so every prefix is a good
    low-rank layer. ``rank`` is at most ``min(in, out)`` (the authors' full inner
    dimension) and shrinks during training (``shrink_``); ``truncate(k)`` cuts to a
    plain ``LowRankLinear`` of the first ``k`` components. ``active_rank`` is a
    training-time switch, not saved: a loaded layer runs at its full stored rank.

    Example:
        >>> dense = torch.nn.Linear(6, 4)
        >>> layer = MaestroLinear.from_linear(dense)
        >>> x = torch.randn(2, 6)
        >>> torch.allclose(layer(x), dense(x), atol=1e-5)
        True
        >>> layer.active_rank = 2
        >>> torch.allclose(layer(x), layer.truncate(2)(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank must be at most min(in, out) = {min(in_features, out_features)}, got {rank}"
            )
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.down = nn.Parameter(torch.zeros(rank, in_features, **kw))
        #: Rank prefix the forward uses (``None``: all ``rank`` components).
        self.active_rank: int | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int | None = None) -> MaestroLinear:
        """From an SVD of a dense layer's weight, ``sqrt(s)`` split between ``U`` and
        ``V`` (the authors' initialisation); full rank (``min(in, out)``) by default,
        where the layer reproduces ``linear`` exactly."""
        from ..decompose import svd_factors

        weight = dense_weight(linear).detach()
        rank = rank or min(weight.shape)
        up, down = svd_factors(weight, rank)
        return cls.from_factors(up, down, linear.bias, dtype=weight.dtype)

    @classmethod
    def from_factors(
        cls, up: Tensor, down: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None
    ) -> MaestroLinear:
        """From ``up`` ``(out, r)`` and ``down`` ``(r, in)``, in that (importance) order."""
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"incompatible factors {tuple(up.shape)} @ {tuple(down.shape)}")
        dtype = dtype or up.dtype
        layer = cls(
            down.shape[1], up.shape[0], up.shape[1], bias is not None, device=up.device, dtype=dtype
        )
        with torch.no_grad():
            layer.up.copy_(up)
            layer.down.copy_(down)
        return layer.set_bias(bias)

    @classmethod
    def from_scratch(
        cls,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        bias: bool = True,
        std: float | None = None,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> MaestroLinear:
        """Random factors (as ``scratch_factors``), full rank by default, zero bias."""
        rank = rank or min(in_features, out_features)
        up, down = scratch_factors(in_features, out_features, rank, std, generator, dtype)
        layer = cls(in_features, out_features, rank, bias, device=device, dtype=dtype)
        with torch.no_grad():
            layer.up.copy_(up)
            layer.down.copy_(down)
            if layer.bias is not None:
                layer.bias.zero_()
        return layer

    def current_rank(self) -> int:
        """The rank the forward uses now (``active_rank`` or ``rank``)."""
        k = self.active_rank
        return self.rank if k is None else max(1, min(int(k), self.rank))

    def _factors(self) -> tuple[Tensor, Tensor]:
        k = self.current_rank()
        if k == self.rank:
            return self.up, self.down
        return self.up[:, :k], self.down[:k]

    def _forward(self, x: Tensor) -> Tensor:
        up, down = self._factors()
        return F.linear(F.linear(x, down), up)

    def macs(self, tokens: int) -> int:
        """``tokens k (in + out)`` at the rank ``k`` in use (``current_rank``).

        Example:
            >>> MaestroLinear(8, 6, rank=6).macs(tokens=1)
            84
        """
        return tokens * self.current_rank() * (self.in_features + self.out_features)

    def weight_product(self) -> Tensor:
        """``U V`` over the components the forward uses (``current_rank``)."""
        up, down = self._factors()
        return up @ down

    def truncate(self, rank: int) -> LowRankLinear:
        """A plain ``LowRankLinear`` holding the first ``rank`` components (and the bias).

        Example:
            >>> layer = MaestroLinear.from_linear(torch.nn.Linear(6, 4))
            >>> layer.truncate(4).weight_product().allclose(layer.weight_product())
            True
        """
        if not 1 <= rank <= self.rank:
            raise ValueError(f"truncation rank must be in [1, {self.rank}], got {rank}")
        bias = None if self.bias is None else self.bias.detach()
        return LowRankLinear.from_factors(
            self.up.detach()[:, :rank], self.down.detach()[:rank], bias, dtype=self.up.dtype
        )

    # -- the group lasso and the importance of each component -----------------------------
    def tail_norms(self) -> tuple[Tensor, Tensor]:
        """``(sqrt(sum_{j>=i} ||u_j||^2), sqrt(sum_{j>=i} ||v_j||^2))`` for every ``i``."""
        u2 = self.up.pow(2).sum(0)
        v2 = self.down.pow(2).sum(1)
        tail_u = u2.flip(0).cumsum(0).flip(0)
        tail_v = v2.flip(0).cumsum(0).flip(0)
        # sqrt has an infinite derivative at 0: an exactly zero tail contributes no
        # gradient instead of NaN.
        tiny = torch.finfo(u2.dtype).tiny
        return tail_u.clamp_min(tiny).sqrt(), tail_v.clamp_min(tiny).sqrt()

    def group_lasso(self) -> Tensor:
        """Maestro's hierarchical group lasso
        ``sum_i ( sqrt(sum_{j>=i} ||u_j||^2) + sqrt(sum_{j>=i} ||v_j||^2) )``.

        Example:
            >>> layer = MaestroLinear.from_factors(torch.eye(2), 2 * torch.eye(2), dtype=torch.float64)
            >>> round(float(layer.group_lasso().detach()), 4)  # (sqrt 2 + 1) + (sqrt 8 + 2)
            7.2426
        """
        tail_u, tail_v = self.tail_norms()
        return tail_u.sum() + tail_v.sum()

    @torch.no_grad()
    def importance(self) -> Tensor:
        """The authors' hierarchical importance of each component, the product of its
        two tail norms: non-increasing in ``i``, so a threshold keeps a prefix."""
        tail_u, tail_v = self.tail_norms()
        return tail_u * tail_v

    # -- shrinking ------------------------------------------------------------------------
    def shrink_(self, rank: int) -> None:
        """Keep the first ``rank`` components, in place.

        The parameters stay the same ``nn.Parameter`` objects (their data is replaced by
        the leading slices), so an optimizer still holds them; its per-parameter state
        must be sliced alike (``rankcut.train.regularizers.shrink_optimizer_state``).
        Gradients are dropped.
        """
        if not 1 <= rank <= self.rank:
            raise ValueError(f"shrink rank must be in [1, {self.rank}], got {rank}")
        if rank == self.rank:
            return
        with torch.no_grad():
            _set_data(self.up, self.up.data[:, :rank].contiguous())
            _set_data(self.down, self.down.data[:rank].contiguous())
        self.up.grad = None
        self.down.grad = None
        self.rank = rank
        if self.active_rank is not None and self.active_rank >= rank:
            self.active_rank = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A resumed run rebuilds the layer at its initial rank, then loads a checkpoint
        # taken after progressive shrinking: take the stored rank.
        up = state_dict.get(prefix + "up")
        if up is not None and up.ndim == 2 and up.shape[1] != self.rank:
            rank = int(up.shape[1])
            if 1 <= rank <= min(self.in_features, self.out_features):
                kw = {"device": self.up.device, "dtype": self.up.dtype}
                with torch.no_grad():
                    _set_data(self.up, torch.empty(self.out_features, rank, **kw))
                    _set_data(self.down, torch.empty(rank, self.in_features, **kw))
                self.up.grad = self.down.grad = None
                self.rank = rank
                self.active_rank = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _set_data(param: nn.Parameter, data: Tensor) -> None:
    """Give ``param`` new ``data`` of another shape, keeping the ``Parameter`` object.

    A parameter caches its gradient accumulator, which records the shape it had; while
    a graph of an earlier step is alive (a training loop's ``loss`` variable keeps the
    previous step's), that accumulator is reused and the next backward fails ("invalid
    gradient ... expected shape"). torch drops the cached accumulator when ``.data``
    changes dtype (``VariableHooks::set_data``), so the data passes through another
    dtype first.
    """
    other = torch.float32 if data.dtype == torch.float64 else torch.float64
    param.data = data.to(other)
    param.data = data


__all__ = [
    "MaestroLinear",
    "SLTrainLinear",
    "lowrank_from_scratch",
    "random_support",
    "scratch_factors",
]
