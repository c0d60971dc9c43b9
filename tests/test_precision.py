"""The low-precision linear products of ``rankcut.calibrate.precision``."""

import pytest
import torch
from torch import nn

from rankcut.calibrate.precision import (
    LowPrecisionLinears,
    compute_precision,
    resolve_compute_dtype,
)
from rankcut.errors import ConfigError
from rankcut.methods import SvdLlmConfig

from .conftest import tiny_llama


def _mode(**kw):
    return LowPrecisionLinears(min_rows=1, min_weight=1, **kw)


def test_products_are_bfloat16_rounded_and_float32_out():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(8, 32)
    with torch.no_grad(), _mode() as mode:
        y = lin(x)
    ref = x.bfloat16().float() @ lin.weight.bfloat16().float().T + lin.bias
    assert y.dtype == torch.float32 and mode.calls == 1
    # the kernel accumulates in float32 and rounds the output to bfloat16
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    assert not torch.equal(y, lin(x))  # really a different product


def test_small_products_and_other_dtypes_stay_exact():
    lin = nn.Linear(32, 16)
    x = torch.randn(8, 32)
    with torch.no_grad(), LowPrecisionLinears() as mode:  # default sizes: too small
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        assert torch.equal(lin.double()(x.double()), lin(x.double()))
    assert mode.calls == 0
    with compute_precision("float32") as none:
        assert none is None


def test_cached_weight_follows_in_place_updates_and_new_tensors():
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)
    with torch.no_grad(), _mode() as mode:
        first = lin(x)
        lin.weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(lin(x), 2 * first, rtol=1e-2, atol=1e-2)
        lin.weight = nn.Parameter(torch.zeros(16, 32))  # a new tensor
        assert torch.count_nonzero(lin(x)) == 0
    assert mode.calls == 3


def test_gradients_reach_inputs_and_weights():
    lin = nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)
    with _mode():
        lin(x).square().sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.zero_grad()
    lin(x).square().sum().backward()
    assert gw.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(gx, x.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(gw, lin.weight.grad, rtol=0.05, atol=0.05)


def test_resolution_and_config_validation():
    assert resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_compute_dtype("auto", "meta") == "float32"
    assert resolve_compute_dtype("auto", "cpu") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="resolve 'auto'"):
        with compute_precision("auto"):
            pass
    with pytest.raises(ConfigError, match="compute_dtype"):
        SvdLlmConfig(compute_dtype="float16")


def test_compress_records_the_resolved_precision():
    import rankcut

    model = tiny_llama()
    calib = torch.randint(0, model.config.vocab_size, (4, 16))
    config = SvdLlmConfig(ratio=0.3, allocation="uniform", compute_dtype="bfloat16")
    result = rankcut.compress(model, config, calib, progress=False)
    assert result.config.compute_dtype == "bfloat16"
    assert "products bfloat16" in result.summary()
    from rankcut.methods import SvdConfig

    plain = rankcut.compress(tiny_llama(), SvdConfig(ratio=0.3, allocation="uniform"))
    assert plain.config.compute_dtype == "float32"  # no calibration: the model never ran
