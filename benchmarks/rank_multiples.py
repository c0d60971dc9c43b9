"""Which ranks run well: time of ``LowRankLinear`` vs dense for SmolLM2-135M's shapes.

Usage:
    .venv/bin/python benchmarks/rank_multiples.py [--threads 2] [--rounds 15]

For each decoder-linear shape of SmolLM2-135M (576x576, 192x576, 1536x576, 576x1536,
written out x in) and each rank in a window around the uniform ranks of ratios 0.2 and
0.4 plus a sweep up to the break-even rank ``mn / (m + n)``, time a factorized layer at
batch-1 decode (1 token) and 512-token prefill. Rounds interleave all ranks and the
dense layer; the minimum over rounds is kept (robust to other jobs on the machine).
Reports the mean time per multiply-add of ranks that are multiples of 8, 16 and 32
against the others, and for each shape the measured speedup against theory, so that
``rank_multiple`` and ``min_speedup`` defaults are measured, not guessed. Writes
``benchmarks/results/rank_multiples.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from rankcut.layers import LowRankLinear
from rankcut.rank import rank_for_ratio

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
RESULTS = Path(__file__).parent / "results"


def ranks_for(m: int, n: int) -> list[int]:
    around = set()
    for ratio in (0.2, 0.4):
        r = rank_for_ratio(m, n, ratio)
        around.update(range(r - 16, r + 17))
    breakeven = m * n // (m + n)
    around.update(range(32, breakeven + 1, 32))
    around.update(range(breakeven - 40, breakeven + 1, 8))
    return sorted(r for r in around if 1 <= r <= min(m, n))


@torch.no_grad()
def time_calls(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--prompt", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = {}
    for m, n in SHAPES:
        dense = nn.Linear(n, m)
        ranks = ranks_for(m, n)
        layers = {r: LowRankLinear(n, m, r) for r in ranks}
        for mode, tokens, inner in (("decode", 1, 50), ("prefill", args.prompt, 1)):
            x = torch.randn(1, tokens, n)
            best = {r: float("inf") for r in [0, *ranks]}
            for _ in range(args.rounds):
                best[0] = min(best[0], time_calls(lambda x=x, d=dense: d(x), inner))
                for r, layer in layers.items():
                    best[r] = min(best[r], time_calls(lambda x=x, la=layer: la(x), inner))
            table[f"{m}x{n}/{mode}"] = best
            print(f"{m}x{n} {mode}: dense {best[0] * 1e6:.1f} us", flush=True)
    summary = summarize(table)
    command = "python benchmarks/rank_multiples.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rank_multiples.json").write_text(
        json.dumps(
            {
                "command": command.strip(),
                "threads": args.threads,
                "seconds": {k: {str(r): t for r, t in v.items()} for k, v in table.items()},
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    (RESULTS / "rank_multiples.md").write_text(render(command.strip(), args, summary))
    print(render(command.strip(), args, summary))


def summarize(table: dict) -> dict:
    out = {}
    for key, best in table.items():
        m, n = (int(v) for v in key.split("/")[0].split("x"))
        dense = best[0]
        # seconds per multiply-add per token, by rank residue class
        per_mac = {r: t / (r * (m + n)) for r, t in best.items() if r}
        classes = {}
        for mult in (8, 16, 32):
            on = [v for r, v in per_mac.items() if r % mult == 0]
            off = [v for r, v in per_mac.items() if r % mult]
            if on and off:
                classes[str(mult)] = statistics.median(off) / statistics.median(on)
        # smallest theoretical speedup at which the factorized layer is measured faster
        faster = sorted(
            (m * n / (r * (m + n)), dense / t) for r, t in best.items() if r and dense / t > 1.0
        )
        slower = sorted(
            (m * n / (r * (m + n)), dense / t) for r, t in best.items() if r and dense / t <= 1.0
        )
        out[key] = {
            "dense_us": dense * 1e6,
            "off_multiple_slowdown": classes,
            "max_theory_where_slower": max((s[0] for s in slower), default=None),
            "min_theory_where_faster": faster[0][0] if faster else None,
            "measured_over_theory_median": statistics.median(
                (dense / t) / (m * n / (r * (m + n))) for r, t in best.items() if r
            ),
        }
    return out


def render(command: str, args, summary: dict) -> str:
    lines = [
        "# Rank multiples: LowRankLinear vs dense on SmolLM2-135M shapes",
        "",
        f"Command: `{command}` ({args.threads} torch threads, fp32, minimum over "
        f"{args.rounds} interleaved rounds). **Measured on a machine shared with other "
        "jobs (2 cores): timings are noisy.**",
        "",
        "*off-multiple slowdown k*: median time per multiply-add of ranks that are not "
        "multiples of k over that of ranks that are (> 1: multiples of k run faster). "
        "*theory*: `mn / (r (m + n))`.",
        "",
        "| shape (out x in) / mode | dense us | off-8 | off-16 | off-32 | "
        "largest theory still slower | smallest theory faster | measured / theory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        c = s["off_multiple_slowdown"]

        def f(v):
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"| {key} | {s['dense_us']:.1f} | {f(c.get('8'))} | {f(c.get('16'))} | "
            f"{f(c.get('32'))} | {f(s['max_theory_where_slower'])} | "
            f"{f(s['min_theory_where_faster'])} | {s['measured_over_theory_median']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
