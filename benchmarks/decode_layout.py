"""Batch-1 (decoding) matrix-vector time by weight layout, for the factor shapes of
SmolLM2-135M at ratios 0.2 and 0.4 and its dense shapes.

Usage:
    .venv/bin/python benchmarks/decode_layout.py [--threads 2] [--copies 30]

One token multiplies each weight once, streaming it from memory; the time depends on
how the weight is laid out and on which kernel runs. For each ``out x in`` shape,
``--copies`` distinct random matrices (so they come from memory, not cache, as in a
model) are multiplied by one vector with: ``F.linear`` on the row-major ``(out, in)``
weight (PyTorch's ``nn.Linear``), ``F.linear`` on the same logical weight stored
column-major (its transpose contiguous), and ``torch.mv`` on each. Medians of 11
rounds, microseconds per matrix. This is what ``rankcut.layers.lowrank.decode_layout``
is based on. Writes ``benchmarks/results/decode_layout.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
#: (out, in): the low-rank factors of SmolLM2-135M's projections at uniform ranks 0.2
#: (down/up of q/o, k/v, gate/up, down) and the dense projections themselves.
SHAPES = [
    (224, 576),
    (576, 224),
    (112, 576),
    (192, 112),
    (336, 576),
    (1536, 336),
    (336, 1536),
    (576, 336),
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
]


def per_matrix_us(fn, copies: int, rounds: int = 11) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / copies * 1e6


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--copies", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for out, inp in SHAPES:
        row_major = [torch.randn(out, inp, generator=gen) for _ in range(args.copies)]
        col_major = [torch.randn(inp, out, generator=gen).t() for _ in range(args.copies)]
        x = torch.randn(1, inp, generator=gen)
        v = x[0]
        kinds = {
            "linear, row-major": (F.linear, row_major, x),
            "linear, column-major": (F.linear, col_major, x),
            "mv, row-major": (torch.mv, row_major, v),
            "mv, column-major": (torch.mv, col_major, v),
        }
        t = {
            name: per_matrix_us(
                lambda f=f, ws=ws, a=a: [f(a, w) if f is F.linear else f(w, a) for w in ws],
                args.copies,
            )
            for name, (f, ws, a) in kinds.items()
        }
        best = min(t, key=t.get)
        mb = out * inp * 4 / 1e6
        rows.append((out, inp, mb, t, best))
        print(f"{out}x{inp}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), flush=True)
    keys = list(rows[0][3])
    lines = [
        "# Batch-1 matrix-vector time by weight layout",
        "",
        f"Command: `.venv/bin/python benchmarks/decode_layout.py --threads {args.threads} "
        f"--copies {args.copies}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"torch {torch.__version__}, float32, {args.threads} threads. Microseconds per "
        f"matrix (median of 11 rounds over {args.copies} distinct matrices, so that "
        "weights come from memory as in a model); GB/s = weight bytes / best time.",
        "",
        "| out x in | MB | " + " | ".join(keys) + " | best | GB/s |",
        "|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for out, inp, mb, t, best in rows:
        cells = " | ".join(f"{t[k]:.1f}" for k in keys)
        lines.append(f"| {out} x {inp} | {mb:.2f} | {cells} | {best} | {mb * 1e3 / t[best]:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_layout.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'decode_layout.md'}")


if __name__ == "__main__":
    main()
