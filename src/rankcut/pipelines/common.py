"""What every pipeline does to one matrix: factorize it and swap in the new layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..calibrate import LayerStats
from ..decompose import all_finite
from ..errors import RankcutError
from ..layers import LowRankLinear, dense_weight
from ..models import replace_module

if TYPE_CHECKING:
    from ..methods import MethodConfig, MethodSpec


def factorize_into(
    model: nn.Module,
    name: str,
    module: nn.Module,
    weight: Tensor | Callable[[], Tensor] | None,
    stats: LayerStats,
    rank: int,
    spec: MethodSpec,
    config: MethodConfig,
    dist=None,
    owner: int = 0,
) -> None:
    """Factorize ``weight`` (float64 ``(out, in)``) with the method; swap in its layer
    (a LowRankLinear, or the structured layer a ``build`` method returns).

    ``weight`` may be a callable, evaluated only where it is needed: with ``dist`` (a
    ``rankcut.distributed.Dist``) only the ``owner`` rank factorizes, and the factors
    are broadcast to the others (low-rank methods only).
    """
    dtype = dense_weight(module).dtype
    device = dense_weight(module).device
    bias = module.bias.detach() if module.bias is not None else None
    if dist is None:
        if callable(weight):
            weight = weight()
        with torch.no_grad():
            layer = spec.make_layer(weight, stats, rank, config, name, bias=bias, dtype=dtype)
        if not all(all_finite(p) for p in layer.parameters()):
            raise RankcutError(f"{spec.name} produced non-finite factors for {name}")
        replace_module(model, name, layer.to(device))
        return
    if spec.build is not None:
        raise RankcutError(
            f"distributed compression supports the low-rank methods only, not {spec.name}"
        )
    up = down = None
    if dist.rank == owner:
        if callable(weight):
            weight = weight()
        with torch.no_grad():
            up, down = spec.factorize(weight, stats, rank, config, name)
        del weight
        if not (all_finite(up) and all_finite(down)):
            raise RankcutError(f"{spec.name} produced non-finite factors for {name}")
    out_f, in_f = dense_weight(module).shape
    shapes = [(out_f, rank), (rank, in_f)]
    up, down = dist.share(
        [up, down] if up is not None else None, shapes, torch.float64, device, owner
    )
    layer = LowRankLinear.from_factors(up, down, bias, dtype=dtype)
    replace_module(model, name, layer.to(device))
