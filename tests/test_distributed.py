"""Two gloo processes on CPU against one: same statistics, same compressed model."""

from __future__ import annotations

import json

import torch
import torch.multiprocessing as mp

import rankcut
from rankcut.calibrate import InputStats
from rankcut.layers import factorized_modules
from rankcut.methods import SvdLlmConfig
from rankcut.streaming import stream_compress

from .test_streaming import calib, save_checkpoint

CONFIG = {"ratio": 0.4, "pipeline": "sequential", "allocation": "uniform"}


def _worker(rank, world, rendezvous, ckpt, out, data):
    import torch.distributed as dist

    from rankcut.distributed import Dist, split_windows

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        group = Dist.current()
        # Statistics: each rank sees its share of the rows, the reduction sums them.
        stats = InputStats(16, want_gram=True, want_abs=True)
        stats.update(split_windows(data, group))
        group.reduce_stats(stats, None)
        if rank == 0:
            torch.save(
                {"gram": stats.gram, "abs": stats.abs_sum, "tokens": stats.tokens}, out + ".pt"
            )
        stream_compress(ckpt, SvdLlmConfig(**CONFIG), calib(n=8), out, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    data = torch.randn(10, 7, 16, generator=torch.Generator().manual_seed(3))
    mp.spawn(
        _worker,
        args=(2, str(tmp_path / "rdv"), str(ckpt), str(tmp_path / "two"), data),
        nprocs=2,
        join=True,
    )
    # Statistics: the all-reduced sums are one process's sums over the same batches
    # (exactly), and over all rows at once up to float32 rounding of the products.
    one = InputStats(16, want_gram=True, want_abs=True)
    for part in torch.tensor_split(data, 2):
        one.update(part)
    two = torch.load(str(tmp_path / "two") + ".pt")
    assert torch.equal(two["gram"], one.gram) and torch.equal(two["abs"], one.abs_sum)
    assert two["tokens"] == one.tokens == 70
    whole = InputStats(16, want_gram=True)
    whole.update(data)
    torch.testing.assert_close(two["gram"], whole.gram, rtol=1e-5, atol=1e-4)
    # The compressed model: same ranks, same factor products and logits.
    meta = stream_compress(
        ckpt, SvdLlmConfig(**CONFIG), calib(n=8), tmp_path / "one", progress=False
    )
    meta2 = json.loads((tmp_path / "two" / "rankcut.json").read_text())
    assert meta2["streaming"]["processes"] == 2 and meta["streaming"]["processes"] == 1
    assert meta2["ranks"] == meta["ranks"] and meta2["layers"] == meta["layers"]
    a, b = rankcut.load(tmp_path / "one"), rankcut.load(tmp_path / "two")
    products = {n: m.weight_product() for n, m in factorized_modules(b)}
    assert len(products) == 21
    for name, layer in factorized_modules(a):
        torch.testing.assert_close(products[name], layer.weight_product(), rtol=1e-4, atol=1e-4)
    x = calib(n=3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            a(input_ids=x).logits, b(input_ids=x).logits, rtol=1e-4, atol=1e-4
        )
