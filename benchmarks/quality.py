"""Quality at a budget: method x ratio -> held-out perplexity, parameters, compression time.

Usage:
    .venv/bin/python benchmarks/quality.py [--model smollm2-135m]
        [--recipes svd asvd svd-llm fwsvd svd-llm:global:sequential ...]
        [--ratios 0.2 0.4] [--samples 32] [--seq-len 512] [--tokens 8192]
        [--data shakespeare-heldout [more texts ...]] [--recover STEPS] [--name quality]

A recipe is ``METHOD[:ALLOCATION[:PIPELINE]]`` (defaults ``uniform`` and ``whole``).
``--recover STEPS`` adds a row per ratio: the last recipe followed by a recovery
fine-tune (distillation from the dense model) of STEPS steps, on windows sampled from
the dense model by default (``--recover-data``, as ``rankcut finetune --data``).

Prints a Markdown table and writes it to benchmarks/results/quality.md (plus quality.json).
Calibration (``--calib``) and evaluation (``--data``) text never overlap.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import rankcut
from rankcut.data import load_text
from rankcut.data.generated import windows_from_spec
from rankcut.data.recovery import RECOVERY_SEQ_LEN, recovery_windows, resolve_recovery_spec
from rankcut.evaluate import param_summary, perplexity
from rankcut.methods import METHODS

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipes", nargs="+", default=["svd", "asvd", "svd-llm", "fwsvd"])
    parser.add_argument("--recover", type=int, default=0, help="recovery steps (0 = no row)")
    parser.add_argument("--recover-lr", type=float, default=1e-4)
    parser.add_argument("--recover-seq-len", type=int, default=RECOVERY_SEQ_LEN)
    parser.add_argument(
        "--recover-data",
        default="auto",
        help="recovery training data, as finetune --data (auto: sampled from the dense model)",
    )
    parser.add_argument(
        "--recover-ratios",
        nargs="+",
        type=float,
        default=[0.2],
        help="ratios that get the recovery row",
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--calib", default="shakespeare")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--data",
        nargs="+",
        default=["shakespeare-heldout"],
        help="one or more evaluation texts (a column each)",
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="quality", help="results file stem")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tok = rankcut.load_tokenizer(args.model)
    dense = rankcut.load(args.model)
    heldout = {name: load_text(name) for name in args.data}
    calib = windows_from_spec(args.calib, tok, args.samples, args.seq_len, args.seed, model=dense)

    def evaluate(model) -> dict[str, float]:
        return {
            name: perplexity(
                model, tok, text, tokens=args.tokens, seq_len=args.seq_len, progress=False
            )["perplexity"]
            for name, text in heldout.items()
        }

    rows = []
    train, data_seconds = None, 0.0  # recovery windows, made once when first needed
    base = evaluate(dense)
    dense_params = param_summary(dense)["params_total"]
    rows.append(
        {
            "method": "dense",
            "allocation": "-",
            "pipeline": "-",
            "ratio": 0.0,
            "perplexity": base,
            "params": dense_params,
            "seconds": 0.0,
        }
    )
    print(f"dense: ppl {base}", flush=True)

    def parse(recipe: str) -> tuple[str, str, str]:
        parts = recipe.split(":") + ["uniform", "whole"][len(recipe.split(":")) - 1 :]
        return parts[0], parts[1], parts[2]

    # Calibration statistics do not depend on the ratio or the allocation: gather them
    # once per method (a superset: the method's own plus what `global` needs) and reuse
    # them. "compress time" is then the allocation + factorization time alone; the
    # one-off statistics time is reported per method.
    stats_seconds: dict[str, float] = {}
    stats_cache: dict = {}
    for recipe in args.recipes:
        method, allocation, pipeline = parse(recipe)
        if method not in stats_cache:
            start = time.perf_counter()
            superset = METHODS[method].config_cls(allocation="global", pipeline="whole")
            stats_cache = {method: rankcut.collect_statistics(dense, superset, calib)}
            stats_seconds[method] = time.perf_counter() - start
            print(f"{method}: statistics in {stats_seconds[method]:.0f} s", flush=True)
        for ratio in args.ratios:
            model = copy.deepcopy(dense)
            config = METHODS[method].config_cls(
                ratio=ratio, allocation=allocation, pipeline=pipeline
            )
            start = time.perf_counter()
            result = rankcut.compress(model, config, calib, stats=stats_cache[method])
            seconds = time.perf_counter() - start
            ppl = evaluate(model)
            row = {
                "method": method,
                "allocation": allocation,
                "pipeline": pipeline,
                "ratio": ratio,
                "perplexity": ppl,
                "params": result.params["model_after"],
                "seconds": seconds,
            }
            rows.append(row)
            print(f"{recipe} @ {ratio}: ppl {ppl}, {seconds:.0f} s", flush=True)
            if args.recover and recipe == args.recipes[-1] and ratio in args.recover_ratios:
                from rankcut.finetune import RecoveryConfig, recover

                if train is None:  # the same windows for every ratio
                    t_data = time.perf_counter()
                    spec = resolve_recovery_spec(args.recover_data, dense)
                    train = recovery_windows(
                        spec, tok, args.recover, args.recover_seq_len, args.seed, model=dense
                    )
                    data_seconds = time.perf_counter() - t_data
                    print(f"recovery data: {spec}, {len(train)} windows, {data_seconds:.0f} s")
                stats = recover(
                    model,
                    train,
                    RecoveryConfig(steps=args.recover, lr=args.recover_lr),
                    teacher=dense,
                )
                ppl = evaluate(model)
                rows.append(
                    {
                        **row,
                        "pipeline": f"{pipeline} + recover {args.recover}",
                        "perplexity": ppl,
                        "seconds": seconds + stats["seconds"],
                        "recovery_seconds": round(stats["seconds"], 1),
                        "recovery_data_seconds": round(data_seconds, 1),
                    }
                )
                print(f"  + recovery ({stats['seconds']:.0f} s): ppl {ppl}", flush=True)
            del model

    lines = [
        f"# {args.name}: held-out perplexity at a parameter budget",
        "",
        f"Model `{args.model}`; calibration `{args.calib}` ({args.samples} x {args.seq_len} "
        f"tokens, seed {args.seed}); evaluation `{args.data}` (first {args.tokens} tokens, "
        f"windows of {args.seq_len}, protocol in README). Ratio = fraction of the targeted "
        "(decoder-layer linear) parameters removed, in total; params = whole model. "
        "Compress time is allocation + factorization (+ recovery where listed); the "
        "calibration statistics are gathered once per method and reused: "
        + ", ".join(f"{m} {t:.0f} s" for m, t in stats_seconds.items())
        + ".",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {platform.machine()} CPU "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"rankcut {rankcut.__version__}.",
        "",
        "| method | allocation | pipeline | ratio | "
        + " | ".join(f"ppl `{n}` (x dense)" for n in args.data)
        + " | params | compress time (s) |",
        "|---|---|---|---|" + "---|" * len(args.data) + "---|---|",
    ]
    for r in rows:
        cells = " | ".join(
            f"{r['perplexity'][n]:.2f} ({r['perplexity'][n] / base[n]:.2f}x)" for n in args.data
        )
        lines.append(
            f"| {r['method']} | {r['allocation']} | {r['pipeline']} | {r['ratio']:.1f} | "
            f"{cells} | {r['params']:,} | {r['seconds']:.1f} |"
        )
    lines += ["", "## Best recipe per ratio (computed from the rows above)", ""]
    for ratio in args.ratios:
        for name in args.data:
            ranked = sorted(
                (r for r in rows if r["ratio"] == ratio), key=lambda r: r["perplexity"][name]
            )
            if len(ranked) < 2:
                continue
            best, second = ranked[0], ranked[1]
            label = "{method}/{allocation}/{pipeline}"
            lines.append(
                f"- ratio {ratio:.1f}, `{name}`: best {label.format(**best)} "
                f"({best['perplexity'][name]:.2f}, {best['perplexity'][name] / base[name]:.2f}x "
                f"dense); next {label.format(**second)} ({second['perplexity'][name]:.2f}), "
                f"{1 - best['perplexity'][name] / second['perplexity'][name]:.0%} lower."
            )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "stats_seconds": stats_seconds}, indent=2)
    )


if __name__ == "__main__":
    main()
