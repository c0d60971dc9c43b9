"""LowRankLinear: construction from nn.Linear and GPT-2 Conv1D, counts, round trips."""

import io

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rankcut.layers import LowRankLinear, dense_weight


def test_from_linear_full_rank_matches():
    torch.manual_seed(0)
    lin = nn.Linear(12, 8)
    lr = LowRankLinear.from_linear(lin, rank=8)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(lr(x), lin(x), atol=1e-5, rtol=1e-5)
    assert (lr.in_features, lr.out_features, lr.rank) == (12, 8, 8)


def test_from_conv1d_full_rank_matches():
    torch.manual_seed(0)
    conv = Conv1D(nf=8, nx=12)  # GPT-2 layout: weight is (in=12, out=8)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    lr = LowRankLinear.from_linear(conv, rank=8)
    x = torch.randn(2, 4, 12)
    torch.testing.assert_close(lr(x), conv(x), atol=1e-4, rtol=1e-4)
    assert dense_weight(conv).shape == (8, 12)
    assert (lr.in_features, lr.out_features) == (12, 8)


def test_truncation_and_to_linear():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6, bias=False)
    lr = LowRankLinear.from_linear(lin, rank=3)
    dense = lr.to_linear()
    x = torch.randn(4, 10)
    torch.testing.assert_close(dense(x), lr(x), atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(dense.weight.detach()) == 3


@pytest.mark.parametrize("bias", [True, False])
def test_param_counts_exact(bias):
    lr = LowRankLinear(30, 20, rank=7, bias=bias)
    stored = sum(p.numel() for p in lr.parameters())
    assert lr.num_params() == stored == 7 * (30 + 20) + (20 if bias else 0)
    assert lr.dense_params() == 30 * 20 + (20 if bias else 0)


def test_forward_never_builds_dense_weight(monkeypatch):
    lr = LowRankLinear(16, 16, rank=2)
    monkeypatch.setattr(lr, "weight_product", lambda: pytest.fail("dense weight rebuilt"))
    lr(torch.randn(2, 16))


def test_extra_repr_and_structure():
    lr = LowRankLinear(5, 4, rank=2, bias=False)
    assert "rank=2" in repr(lr)
    rebuilt = LowRankLinear.from_structure(lr.structure(), device="cpu")
    assert rebuilt.structure() == lr.structure()


def test_fast_forward_equals_module_calls_and_keeps_hooks():
    """The functional fast path gives the module path's output; hooks and wrappers on the
    factors still run (calibration hooks and LoRA adapters rely on them)."""
    torch.manual_seed(0)
    lr = LowRankLinear.from_linear(nn.Linear(12, 8), rank=4)
    x = torch.randn(3, 12, requires_grad=True)
    fast = lr(x)
    torch.testing.assert_close(fast, lr.up(lr.down(x)), atol=0, rtol=0)
    fast.sum().backward()
    assert lr.down.weight.grad is not None and x.grad is not None

    seen = []
    handle = lr.down.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    lr(x)
    handle.remove()
    assert seen == [torch.Size([3, 4])]

    class Scaled(nn.Module):  # a wrapper in place of a factor, as peft's LoRA layers are
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, h):
            return 2 * self.base(h)

    lr.up = Scaled(lr.up)
    torch.testing.assert_close(lr(x), 2 * fast, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 12), (1, 12), (12,)])
@pytest.mark.parametrize("bias", [True, False])
def test_single_token_path_equals_the_matrix_path(shape, bias):
    """One token goes through two matrix-vector products (decoding); the result and the
    gradients are those of the batched path."""
    torch.manual_seed(0)
    lr = LowRankLinear.from_linear(nn.Linear(12, 20, bias=bias), rank=5)
    x = torch.randn(shape, requires_grad=True)
    one = lr(x)
    assert one.shape == (*shape[:-1], 20)
    batched = lr(torch.cat([x.reshape(1, 12), torch.zeros(1, 12)]))[0]
    torch.testing.assert_close(one.reshape(20), batched, atol=1e-6, rtol=1e-6)
    one.sum().backward()
    grads = (x.grad.clone(), lr.down.weight.grad.clone(), lr.up.weight.grad.clone())
    lr.zero_grad()
    x.grad = None
    (lr.up.weight @ (lr.down.weight @ x.reshape(12))).sum().backward()
    for got, want in zip(grads, (x.grad, lr.down.weight.grad, lr.up.weight.grad), strict=True):
        torch.testing.assert_close(got, want.reshape(got.shape), atol=1e-6, rtol=1e-6)


def test_decode_layout_keeps_wide_factors_column_major_through_a_round_trip():
    torch.manual_seed(0)
    lr = LowRankLinear.from_linear(nn.Linear(12, 20), rank=5)
    up, down = lr.up.weight, lr.down.weight
    assert up.shape == (20, 5) and up.stride() == (1, 20)  # column-major: more outputs
    assert down.shape == (5, 12) and down.is_contiguous()  # row-major: fewer outputs
    state = {k: v.contiguous() for k, v in lr.state_dict().items()}  # as safetensors writes
    for assign in (False, True):  # rankcut.load assigns the saved tensors
        rebuilt = LowRankLinear(12, 20, 5, device="meta" if assign else None)
        rebuilt.load_state_dict(state, assign=assign)
        assert rebuilt.up.weight.stride() == (1, 20)
    x = torch.randn(4, 12)
    torch.testing.assert_close(rebuilt(x), lr(x), atol=0, rtol=0)
    assert lr.to(torch.float64).up.weight.stride() == (1, 20)  # dtype casts keep it
    buffer = io.BytesIO()  # the layer pickles (torch.save of a whole model)
    torch.save(lr, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    assert unpickled.up.weight.stride() == (1, 20)
    torch.testing.assert_close(unpickled(x.double()), lr(x.double()), atol=0, rtol=0)
