"""Which calibration data: held-out perplexity on two texts per calibration spec.

Usage:
    .venv/bin/python benchmarks/fortunes_text.py /tmp/fortunes.txt
    .venv/bin/python benchmarks/calibration.py [--calibs shakespeare generated
        shakespeare+generated] [--allocations uniform global] [--ratio 0.2]
        [--data shakespeare-heldout /tmp/fortunes.txt] [--tokens 4096]

Every run starts from the dense model, calibrates SVD-LLM on ``--samples`` x
``--seq-len`` tokens of each calibration spec (seed 0; statistics gathered once per spec
and shared by the allocations) and scores the first ``--tokens`` tokens of each
evaluation text. Writes benchmarks/results/calibration.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _perplexity import perplexities  # (benchmarks/ is the script folder)

import rankcut
from rankcut.data import load_text
from rankcut.data.generated import windows_from_spec
from rankcut.methods import SvdLlmConfig

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--calibs", nargs="+", default=["shakespeare", "generated", "shakespeare+generated"]
    )
    parser.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--data", nargs="+", default=["shakespeare-heldout", "/tmp/fortunes.txt"])
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()

    tok = rankcut.load_tokenizer(args.model)
    dense = rankcut.load(args.model)
    texts = {name: load_text(name) for name in args.data}

    def ppl(model) -> dict[str, float]:
        return perplexities(model, tok, texts, args.tokens, args.seq_len)

    base = ppl(dense)
    print(f"dense: {base}", flush=True)
    rows = []
    for spec in args.calibs:
        start = time.perf_counter()
        calib = windows_from_spec(spec, tok, args.samples, args.seq_len, 0, model=dense)
        stats = rankcut.collect_statistics(dense, SvdLlmConfig(allocation="global"), calib)
        prep = time.perf_counter() - start
        for allocation in args.allocations:
            model = copy.deepcopy(dense)
            config = SvdLlmConfig(ratio=args.ratio, allocation=allocation)
            rankcut.compress(model, config, calib, progress=False, stats=stats)
            rows.append({"calib": spec, "allocation": allocation, "perplexity": ppl(model)})
            print(f"{spec} / {allocation}: {rows[-1]['perplexity']}", flush=True)
            del model
        print(f"{spec}: data + statistics {prep:.0f} s", flush=True)
        del stats

    lines = [
        "# Calibration data: held-out perplexity per calibration spec",
        "",
        f"Model `{args.model}`, `svd-llm`, ratio {args.ratio}, {args.samples} x "
        f"{args.seq_len} calibration tokens (seed 0); evaluation: first {args.tokens} tokens "
        f"of each text. Measured {datetime.now(timezone.utc):%Y-%m-%d}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| calibration | allocation | " + " | ".join(f"`{n}` (x dense)" for n in texts) + " |",
        "|---|---|" + "---|" * len(texts),
        "| - | dense | " + " | ".join(f"{base[n]:.2f}" for n in texts) + " |",
    ]
    for r in rows:
        cells = " | ".join(
            f"{r['perplexity'][n]:.2f} ({r['perplexity'][n] / base[n]:.2f}x)" for n in texts
        )
        lines.append(f"| `{r['calib']}` | {r['allocation']} | {cells} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration.md").write_text(table + "\n")
    (RESULTS / "calibration.json").write_text(
        json.dumps({"args": vars(args), "dense": base, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
