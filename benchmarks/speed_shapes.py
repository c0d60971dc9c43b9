"""Low-rank vs dense linear speed as the matrix grows: where the theoretical ratio is reached.

Usage:
    .venv/bin/python benchmarks/speed_shapes.py [--sizes 576 1024 2048 4096] [--ratios 0.2 0.4]
        [--threads 2] [--repeats 15]

For square ``d x d`` and MLP-shaped ``(8/3 d) x d`` matrices, a ``LowRankLinear`` at the
uniform rank of each ratio (``r = floor((1 - c) m n / (m + n))``, rounded down to a
multiple of 8 as rankcut's default does) against ``nn.Linear`` of the same shape:
batch-1 decode (one token) and 512-token prefill, float32, alternating the two layers
and taking medians. Theoretical speedup = ``m n / (r (m + n))``. Random weights: speed
does not depend on the values. Writes benchmarks/results/speed_shapes.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from rankcut.layers import LowRankLinear
from rankcut.rank import rank_for_ratio
from rankcut.rank.budget import round_rank

RESULTS = Path(__file__).parent / "results"


def timed(layer: nn.Module, x: torch.Tensor, inner: int) -> float:
    """Seconds per call, over ``inner`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(inner):
        layer(x)
    return (time.perf_counter() - start) / inner


@torch.inference_mode()
def measure(m: int, n: int, rank: int, tokens: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call of the dense and the low-rank layer, alternating."""
    dense = nn.Linear(n, m, bias=False)
    low = LowRankLinear.from_factors(torch.randn(m, rank), torch.randn(rank, n))
    x = torch.randn(tokens, n)
    inner = min(1000, max(3, int(2e8 // (m * n * tokens))))  # about 0.05-0.2 s per timing
    for layer in (dense, low):
        timed(layer, x, inner)  # warm-up
    d, lr = [], []
    for _ in range(repeats):
        d.append(timed(dense, x, inner))
        lr.append(timed(low, x, inner))
    return statistics.median(d), statistics.median(lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1024, 2048, 4096])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--multiple", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for d in args.sizes:
        for m, n, kind in ((d, d, "square"), (d * 8 // 3 // 64 * 64, d, "mlp up")):
            for ratio in args.ratios:
                rank = round_rank(rank_for_ratio(m, n, ratio), args.multiple)
                theory = m * n / (rank * (m + n))
                for label, tokens in (("decode (1 token)", 1), ("prefill (512 tokens)", 512)):
                    dense_s, low_s = measure(m, n, rank, tokens, args.repeats)
                    measured = dense_s / low_s
                    rows.append(
                        {
                            "shape": [m, n],
                            "kind": kind,
                            "ratio": ratio,
                            "rank": rank,
                            "mode": label,
                            "dense_us": dense_s * 1e6,
                            "lowrank_us": low_s * 1e6,
                            "theoretical": theory,
                            "measured": measured,
                            "fraction_of_theory": measured / theory,
                        }
                    )
                    print(rows[-1], flush=True)
    lines = [
        "# Low-rank vs dense linear speed by matrix size",
        "",
        "Command: `.venv/bin/python benchmarks/speed_shapes.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
        )
        + "`",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} CPU, "
        f"{args.threads} threads, torch {torch.__version__}; float32, medians of "
        f"{args.repeats} alternating timings. Ranks: uniform rank of the ratio rounded down "
        f"to a multiple of {args.multiple}.",
        "",
        "| shape (out x in) | ratio | rank | mode | dense us | low-rank us | theory | "
        "measured | measured / theory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['ratio']} | {r['rank']} | {r['mode']} | "
            f"{r['dense_us']:.1f} | {r['lowrank_us']:.1f} | {r['theoretical']:.2f}x | "
            f"{r['measured']:.2f}x | {r['fraction_of_theory']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed_shapes.md").write_text(table + "\n")
    (RESULTS / "speed_shapes.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
