"""Perplexity vs ratio (0.1 to 0.5): uniform svd-llm against a better recipe, dense as a line.

Usage:
    .venv/bin/pip install matplotlib   # or: pip install -e '.[bench]'
    .venv/bin/python benchmarks/quality_curve.py [--best svd-llm:global:sequential]
        [--ratios 0.1 0.2 0.3 0.4 0.5] [--data shakespeare-heldout] [--tokens 4096]

Writes benchmarks/results/quality.png and quality_curve.md.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from _perplexity import perplexities  # (benchmarks/ is the script folder)

import rankcut
from rankcut.data import load_text
from rankcut.data.generated import windows_from_spec
from rankcut.methods import METHODS

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--baseline", default="svd-llm:uniform:whole")
    parser.add_argument("--best", default="svd-llm:global:sequential")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--calib", default="shakespeare")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--data", nargs="+", default=["shakespeare-heldout"])
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    tok = rankcut.load_tokenizer(args.model)
    dense = rankcut.load(args.model)
    calib = windows_from_spec(args.calib, tok, args.samples, args.seq_len, 0, model=dense)
    texts = {name: load_text(name) for name in args.data}

    def ppl(model) -> dict[str, float]:
        return perplexities(model, tok, texts, args.tokens, args.seq_len)

    base = ppl(dense)
    curves: dict[str, list[dict[str, float]]] = {}
    stats_cache: dict = {}  # calibration statistics, gathered once per recipe, not per ratio
    for recipe in (args.baseline, args.best):
        method, allocation, pipeline = recipe.split(":")
        curves[recipe] = []
        for ratio in args.ratios:
            model = copy.deepcopy(dense)
            config = METHODS[method].config_cls(
                ratio=ratio, allocation=allocation, pipeline=pipeline
            )
            if recipe not in stats_cache:
                stats_cache = {recipe: rankcut.collect_statistics(dense, config, calib)}
            rankcut.compress(model, config, calib, progress=False, stats=stats_cache[recipe])
            curves[recipe].append(ppl(model))
            print(f"{recipe} @ {ratio}: {curves[recipe][-1]}", flush=True)
            del model

    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4), squeeze=False)
    for ax, name in zip(axes[0], texts, strict=True):
        for recipe, values in curves.items():
            ax.plot(args.ratios, [v[name] for v in values], marker="o", label=recipe)
        ax.axhline(base[name], color="gray", linestyle="--", label=f"dense ({base[name]:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("ratio of targeted parameters removed")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{args.model} on {Path(name).name}")
        ax.legend()
    fig.suptitle(f"calibration: {args.calib} ({args.samples} x {args.seq_len} tokens)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "quality.png", dpi=100)
    lines = [
        "# quality curve: perplexity vs ratio",
        "",
        f"Model `{args.model}`, calibration `{args.calib}` ({args.samples} x {args.seq_len} "
        f"tokens, seed 0), evaluation: first {args.tokens} tokens of each text. "
        "Plot: `quality.png`.",
        "",
        "| text | ratio | " + " | ".join(curves) + " |",
        "|---|---|" + "---|" * len(curves),
    ]
    for name in texts:
        lines.append(
            f"| {name} | 0 (dense) | " + " | ".join(f"{base[name]:.2f}" for _ in curves) + " |"
        )
        for i, ratio in enumerate(args.ratios):
            cells = " | ".join(f"{v[i][name]:.2f}" for v in curves.values())
            lines.append(f"| {name} | {ratio:.1f} | {cells} |")
    table = "\n".join(lines)
    print(table)
    (RESULTS / "quality_curve.md").write_text(table + "\n")
    (RESULTS / "quality_curve.json").write_text(
        json.dumps({"args": vars(args), "dense": base, "curves": curves}, indent=2)
    )


if __name__ == "__main__":
    main()
