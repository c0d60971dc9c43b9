"""Speed measurement structures and speed-aware ranks (no wall-clock assertions)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rankcut
from rankcut.evaluate.speed import (
    SpeedSettings,
    compare,
    decoder_linears,
    format_comparison,
    theoretical_speedup,
)
from rankcut.layers import LowRankLinear
from rankcut.rank import AllocationInput, allocate, budget, total_cost
from rankcut.rank.budget import fast_rank_cap, round_rank, speed_round

from .conftest import tiny_llama
from .layer_zoo import LAYER_NAMES, compressed_llama
from .macs_count import count_macs

FAST = SpeedSettings(prompt=16, new_tokens=3, repeats=2, warmup=1, linear_repeats=2)


@pytest.fixture(scope="module")
def pair():
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    rankcut.compress(model, rankcut.SvdConfig(ratio=0.5, allocation="uniform"), progress=False)
    return model, dense


def test_theoretical_speedup_counts_multiply_adds(pair):
    model, dense = pair
    th = theoretical_speedup(model)
    now = sum(m.rank * (m.in_features + m.out_features) for m in decoder_linears(model).values())
    full = sum(m.in_features * m.out_features for m in decoder_linears(model).values())
    assert th["linears_macs_per_token"] == now
    assert th["linears_dense_macs_per_token"] == full
    assert th["linears"] == pytest.approx(full / now)
    head = 64 * 400  # tied LM head: outside the blocks, counted in the model ratio only
    assert th["other_linear_macs_per_token"] == head
    assert 1.0 < th["model"] < th["linears"]
    assert theoretical_speedup(dense)["linears"] == 1.0
    assert len(decoder_linears(dense)) == len(decoder_linears(model)) == 14


def test_compare_returns_sane_structure(pair):
    model, dense = pair
    result = compare(model, dense, FAST, progress=False)
    json.dumps(result)  # JSON-ready
    for key in ("model", "baseline"):
        rep = result[key]
        assert rep["prefill_tokens_per_s"] > 0 and rep["decode_tokens_per_s"] > 0
        assert rep["linears_prefill_seconds"] > 0 and rep["linears_decode_seconds"] > 0
        assert len(rep["samples"]["decode"]) == FAST.repeats
        assert len(rep["samples"]["lin_prefill"]) == FAST.linear_repeats
    assert result["model"]["param_bytes"] < result["baseline"]["param_bytes"]
    assert result["model"]["params"] * 4 == result["model"]["param_bytes"]
    assert set(result["measured"]) == {"prefill", "decode", "linears_prefill", "linears_decode"}
    assert set(result["measured_best"]) == set(result["measured"])
    assert all(v > 0 for v in result["measured"].values())
    text = format_comparison(result)
    assert "decode tokens/s" in text and "theoretical" in text


def test_compare_without_baseline(pair):
    result = compare(pair[0], None, FAST, progress=False)
    assert "baseline" not in result and "measured" not in result
    assert "model" in format_comparison(result)


def test_bench_cli_json(tmp_path, tiny_llama_dir, capsys):
    from rankcut.cli import main

    out = tmp_path / "c"
    args = ["compress", "--model", tiny_llama_dir, "--method", "svd", "--ratio", "0.4"]
    assert main(["-q", *map(str, args), "--allocation", "uniform", "--out", str(out)]) == 0
    capsys.readouterr()
    bench = ["bench", str(out), "--baseline", "source", "--prompt", "8", "--new-tokens", "2"]
    assert main(["-q", *bench, "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["baseline_spec"] == str(tiny_llama_dir)
    assert result["settings"]["prompt"] == 8 and result["theoretical"]["linears"] > 1


# ---------------------------------------------------------------- speed-aware ranks

SMOL = {
    f"{layer}.{k}": shape
    for layer in range(4)
    for k, shape in {
        "q": (576, 576),
        "k": (192, 576),
        "o": (576, 576),
        "up": (1536, 576),
        "down": (576, 1536),
    }.items()
}


def test_round_rank_and_cap():
    assert round_rank(231, 8) == 224 and round_rank(231, 1) == 231
    assert round_rank(31, 8) == 31  # below 4 multiples: left alone
    # r (m + n) <= m n / s
    assert fast_rank_cap(576, 576, 1.1) * 1152 * 1.1 <= 576 * 576
    assert (fast_rank_cap(576, 576, 1.1) + 1) * 1152 * 1.1 > 576 * 576


@settings(max_examples=30, deadline=None)
@given(
    ratio=st.floats(0.1, 0.7),
    multiple=st.sampled_from([8, 16, 32]),
    name=st.sampled_from(["uniform", "energy", "global", "elbow"]),
)
def test_speed_round_multiples_and_budget(ratio, multiple, name):
    gen = torch.Generator().manual_seed(0)
    spectra = {
        k: torch.sort(torch.rand(min(s), generator=gen, dtype=torch.float64), descending=True)[0]
        ** 3
        for k, s in SMOL.items()
    }
    inp = AllocationInput(SMOL, ratio, spectra=spectra, rank_multiple=multiple, min_speedup=1.1)
    ranks = allocate(name, inp)
    assert total_cost(SMOL, ranks) <= budget(SMOL, ratio)
    for k, r in ranks.items():
        assert r == 0 or r < 4 * multiple or r % multiple == 0, (k, r)
        m, n = SMOL[k]
        assert r == 0 or m * n / (r * (m + n)) >= 1.1


def test_no_speed_gain_stays_dense():
    shapes = {"a": (576, 576), "b": (576, 576)}
    near_breakeven = {"a": 280, "b": 100}  # 576*576/(280*1152) = 1.03 < 1.1
    limit = total_cost(shapes, {"a": 0, "b": 100})
    out = speed_round(shapes, near_breakeven, limit, 8, 1.1)
    assert out["a"] == 0
    assert out["b"] % 8 == 0 and total_cost(shapes, out) <= limit
    # small ranks are neither rounded nor grown into slack of the budget
    assert speed_round(shapes, {"a": 20, "b": 21}, 10**9, 8, 1.1) == {"a": 20, "b": 21}
    # without the speed rule the near-break-even rank is kept
    assert speed_round(shapes, near_breakeven, total_cost(shapes, near_breakeven), 1, 1.0) == (
        near_breakeven
    )


def test_speed_round_refills_budget_uniformly():
    inp = AllocationInput(SMOL, 0.2, rank_multiple=16, min_speedup=1.1)
    ranks = allocate("uniform", inp)
    limit = total_cost(SMOL, allocate("uniform", AllocationInput(SMOL, 0.2)))
    spent = total_cost(SMOL, ranks)
    assert spent <= limit
    # no module can take one more step of 16 within the uniform cost and the speed cap
    for k, r in ranks.items():
        m, n = SMOL[k]
        assert spent + 16 * (m + n) > limit or r + 16 > fast_rank_cap(m, n, 1.1)


def test_config_rank_multiple_reaches_compress():
    model = tiny_llama()
    cfg = rankcut.SvdConfig(ratio=0.3, allocation="uniform", rank_multiple=4, min_speedup=1.1)
    result = rankcut.compress(model, cfg, progress=False)
    assert all(r < 16 or r % 4 == 0 for r in result.ranks.values())
    assert any(r >= 16 for r in result.ranks.values())
    assert result.params["targeted_after"] <= 0.7 * result.params["targeted_before"]
    with pytest.raises(rankcut.ConfigError):
        rankcut.SvdConfig(rank_multiple=0)
    with pytest.raises(rankcut.ConfigError):
        rankcut.SvdConfig(min_speedup=0.5)


def test_lowrank_decode_is_two_products():
    """One token: two matrix-vector products with the thin factors; a batch: two thin
    matrix products. Rebuilding ``up @ down`` (a ``(6, 2) @ (2, 8)`` product) fails it."""
    layer = LowRankLinear(8, 6, 2)
    assert layer.num_params() == 2 * 14 + 6
    one = count_macs(layer, torch.randn(1, 1, 8))
    assert one.products == [("mv", [(2, 8), (8,)]), ("mv", [(6, 2), (2,)])]
    batch = count_macs(layer, torch.randn(3, 8))
    assert batch.products == [("mm", [(3, 8), (8, 2)]), ("addmm", [(6,), (3, 2), (2, 6)])]
    assert (one.macs, batch.macs) == (layer.macs(1), layer.macs(3)) == (28, 84)


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("tokens", [1, 64])
def test_theory_counts_what_the_decoder_linears_execute(name, tokens):
    """The theory column is each layer's own ``macs``: the multiply-adds that running
    every decoder linear on ``tokens`` tokens executes, counted from the aten ops."""
    model = compressed_llama(name)
    th = theoretical_speedup(model, tokens=tokens)
    executed = dense = 0
    for module in decoder_linears(model).values():
        n = module.in_features
        executed += count_macs(module, torch.randn(1, tokens, n)).macs
        dense += tokens * module.out_features * n
    assert th["tokens"] == tokens
    assert th["linears_macs_per_token"] * tokens == pytest.approx(executed, rel=1e-12)
    assert th["linears_dense_macs_per_token"] * tokens == dense
    assert th["linears"] == pytest.approx(dense / executed)
