"""Quantizers: absmax integer codes and the registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.decompose.quantize import absmax_quantize, dequantize
from rankcut.errors import ConfigError
from rankcut.quant import QUANTIZERS, get_quantizer


def test_quantizer_registry():
    assert {"int8", "int4"} <= set(QUANTIZERS)
    with pytest.raises(ConfigError, match="unknown quantizer"):
        get_quantizer("int3-nope")


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_absmax_round_trip_error_is_at_most_half_a_step(bits, seed):
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w[2] = 0.0  # an all-zero row stays exactly zero
    codes, scale = absmax_quantize(w, bits)
    top = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= top
    err = (dequantize(codes, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-12)
    assert torch.equal(dequantize(codes, scale)[2], torch.zeros(7, dtype=torch.float64))
    # each non-zero row's largest entry is represented exactly (it maps to +-top)
    assert torch.all(codes.abs().amax(dim=1)[[0, 1, 3, 4]] == top)


def test_quantizer_round_trip_matches_its_bits():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    e8 = (get_quantizer("int8").round_trip(w) - w).norm()
    e4 = (get_quantizer("int4").round_trip(w) - w).norm()
    assert 0 < e8 < e4 < w.norm() / 4
