"""Low rank while training: every `rankcut train` method from scratch on Shakespeare.

Usage:
    .venv/bin/python benchmarks/train.py [--steps 150] [--ratios 0.5 0.25]
        [--methods dense lrt sltrain maestro trp galore] [--name train]

Every run is the same command, `rankcut train --arch tiny --data shakespeare` (validation:
the held-out works, `shakespeare-heldout`, disjoint from the training works), in its own
process (so that peak RSS is the run's own), with equal steps, batch and sequence length,
hence equal tokens. The factorized methods get `--param-ratio P` of the dense targets'
parameters; `galore` gets the same P, which it turns into the uniform rank that the
factorized methods hold (`rankcut.train.galore_method`). Then:

- Maestro: it trains at full rank whatever the budget (the budget only decides the final
  cut), so it is trained once, with no budget (`maestro@full`), and cut at each
  `--param-ratio` exactly as its `finalize` would cut (`maestro@P`), and at 8 ranks (5%
  to 100% of each matrix's full rank), against truncated SVD (`SvdConfig`) and SVD-LLM
  (`SvdLlmConfig`, calibrated on training text) of the `dense` model at the same ranks;
- TRP: validation perplexity before and after its final factorization, and its ranks.

Writes benchmarks/results/NAME.md, NAME.json and NAME.png (validation loss curves) and
NAME-maestro.png (perplexity against parameters). Sized for about 40 minutes on 2 CPU
cores at the defaults: measured on one busy thread, a `tiny` step of 8 x 128 tokens took
1.8 s (dense), 1.6 (lrt), 1.8 (sltrain), 2.6 (trp), 2.1 (galore), 4.6 (maestro: two
forward passes and a distillation per step), plus about 30 s of set-up per run (the
tokenizer); `--steps` scales it. `--steps 5 --eval-tokens 512 --name train-smoke` checks
that it works.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from _results import write_keeping_readings  # (benchmarks/ is the script folder)

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent

#: Fractions of each matrix's full rank at which the Maestro model is cut.
CUTS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)
TARGETS = {  # the targets: (method, ratio) -> relative perplexity allowed
    ("lrt", 0.5): 0.10,
    ("sltrain", 0.5): 0.10,
}


def run_train(args, out: Path, method: str, budget: list[str]) -> dict:
    """One `rankcut train` run in a subprocess; its rankcut.json training summary."""
    cmd = [
        sys.executable, "-m", "rankcut", "-q", "train",
        "--data", args.data, "--arch", args.arch, "--method", method,
        "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
        "--seed", str(args.seed), "--eval-every", str(args.eval_every),
        "--eval-tokens", str(args.eval_tokens), "--checkpoint-every", "0",
        "--out", str(out), "--overwrite", *budget,
    ]  # fmt: skip
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    for option in args.option.get(method, []):
        cmd += ["--option", option]
    if args.reuse and (out / "rankcut.json").is_file():
        print(f"reusing {out}", flush=True)
    else:
        print("$ " + " ".join(cmd[2:]), flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(cmd, check=True, env=env)
    return json.loads((out / "rankcut.json").read_text())["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument(
        "--methods", nargs="+", default=["dense", "lrt", "sltrain", "maestro", "trp", "galore"]
    )
    parser.add_argument("--calib-samples", type=int, default=16, help="SVD-LLM calibration")
    parser.add_argument(
        "--option",
        nargs="+",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="method options, e.g. galore:update_proj_gap=50",
    )
    parser.add_argument("--runs", default="runs/bench-train", help="folder of the trained models")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --runs")
    parser.add_argument("--name", default="train", help="results file stem")
    args = parser.parse_args()
    options: dict[str, list[str]] = {}
    for text in args.option:
        method, _, option = text.partition(":")
        options.setdefault(method, []).append(option)
    args.option = options

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    runs_dir = Path(args.runs)
    runs: dict[str, dict] = {}
    for method in args.methods:
        if method == "dense":
            runs["dense"] = run_train(args, runs_dir / "dense", "dense", [])
        elif method == "maestro":
            # Maestro trains at full rank whatever the budget (the budget only decides
            # the cut in finalize): one run, cut below at each budget and at 8 ranks.
            runs["maestro@full"] = run_train(args, runs_dir / "maestro-full", "maestro", [])
        else:
            for ratio in args.ratios:
                key = f"{method}@{ratio:g}"
                budget = ["--param-ratio", str(ratio)]
                runs[key] = run_train(args, runs_dir / key.replace("@", "-p"), method, budget)

    maestro = None
    if "maestro@full" in runs:
        maestro = maestro_cuts(args, runs, runs_dir)
    wall = time.perf_counter() - start
    write_results(args, runs, maestro, wall, plt)


def maestro_cuts(args, runs: dict, runs_dir: Path) -> dict | None:
    """Cut the full-rank Maestro run at each budget (as its finalize would) and at 8
    ranks, against truncated SVD and SVD-LLM of the dense run at the same ranks."""
    import rankcut
    from rankcut.data import calibration_windows, tokenize
    from rankcut.errors import RankcutError
    from rankcut.evaluate import param_summary
    from rankcut.methods import SvdConfig, SvdLlmConfig
    from rankcut.models.structure import find_targets, replace_module
    from rankcut.train.loop import (
        TrainConfig,
        load_texts,
        target_params,
        validation_loss,
        windows,
    )
    from rankcut.train.lowrank_methods import maestro_cut
    from rankcut.train.methods import TrainSetup, train_method

    # compress's per-matrix notes (e.g. Gram diagonal shifts) would flood the output
    logging.getLogger("rankcut").setLevel(logging.ERROR)
    trained = rankcut.load(runs_dir / "maestro-full")
    tok = rankcut.load_tokenizer(runs_dir / "maestro-full")
    full_summary = runs["maestro@full"]
    names = list(full_summary["finalize"].get("ranks") or find_targets(trained))
    # the very validation windows of the runs (the held-out works for shakespeare)
    train_text, held_text, _ = load_texts(TrainConfig(data=args.data))
    held = windows(tokenize(held_text, tok, max_tokens=args.eval_tokens), args.seq_len, [])
    dense_targets = full_summary["params"]["dense_targets"]

    def measure(model) -> dict:
        loss = validation_loss(model, held, args.batch)
        kept = target_params(model, names)
        return {
            "perplexity": math.exp(loss),
            "params": param_summary(model)["params_total"],
            "targets_ratio": kept / dense_targets,
        }

    method = train_method("maestro")
    for ratio in args.ratios:
        model = copy.deepcopy(trained)
        setup = TrainSetup(targets=names, param_ratio=ratio)
        for name in names:
            layer = model.get_submodule(name)
            rank = method.budget_rank(setup, name, layer.out_features, layer.in_features)
            replace_module(model, name, layer.truncate(min(rank, layer.rank)))
        m = measure(model)
        params = {**full_summary["params"], "model": m["params"], "final_ratio": m["targets_ratio"]}
        runs[f"maestro@{ratio:g}"] = {
            **full_summary,
            "perplexity": m["perplexity"],
            "perplexity_before_finalize": full_summary["perplexity"],
            "params": params,
            "cut_from": "maestro@full",
        }
    if "dense" not in runs:
        return None
    dense = rankcut.load(runs_dir / "dense")
    calib = calibration_windows(train_text, tok, args.calib_samples, args.seq_len, 0)
    result = {"cuts": list(CUTS), "ranks": [], "maestro": [], "svd": [], "svd-llm": []}
    for fraction in CUTS:
        model = copy.deepcopy(trained)
        ranks = maestro_cut(model, fraction=fraction)
        result["ranks"].append(sorted(set(ranks.values())))
        result["maestro"].append(measure(model))
        pattern = {re.escape(n) + "$": r for n, r in ranks.items()}
        for label, cls in (("svd", SvdConfig), ("svd-llm", SvdLlmConfig)):
            model = copy.deepcopy(dense)
            # ratio is unused: every target's rank is given (a rank that would not save
            # parameters leaves the matrix dense, as rankcut always does)
            config = cls(
                ratio=0.5,
                allocation="uniform",
                rank_pattern=pattern,
                rank_multiple=1,
                min_speedup=1.0,
            )
            data = calib if label == "svd-llm" else None
            try:
                rankcut.compress(model, config, data, progress=False)
            except RankcutError:  # no matrix saves parameters at these ranks: it is dense
                model = dense
            result[label].append(measure(model))
        print(f"cut {fraction:.0%}: " + ", ".join(
            f"{k} {result[k][-1]['perplexity']:.2f}" for k in ("maestro", "svd", "svd-llm")
        ), flush=True)  # fmt: skip
    result["dense"] = measure(dense)
    return result


def _ranks(finalize: dict) -> str:
    """``min-max (median m)`` of the ranks a method's finalize reports, per matrix."""
    ranks = sorted((finalize.get("reached_ranks") or finalize.get("ranks") or {}).values())
    if not ranks:
        return "none reported"
    ratio = finalize.get("targets_param_ratio")
    kept = f", targets keep {ratio:.1%} of dense parameters" if ratio is not None else ""
    return f"{ranks[0]} to {ranks[-1]} (median {ranks[len(ranks) // 2]}){kept}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def write_results(args, runs: dict, maestro: dict | None, wall: float, plt) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dense = runs.get("dense")
    lines = [
        f"# Low rank while training: `rankcut train` from scratch ({args.arch})",
        "",
        f"Command: `.venv/bin/python benchmarks/train.py {' '.join(sys.argv[1:])}` "
        f"({wall / 60:.1f} min in all; {torch.get_num_threads()} threads). Run one job at "
        "a time with nothing else on the machine (tokens/s and wall time depend on it).",
        "",
        f"Every run: `rankcut train --arch {args.arch} --data {args.data}`, {args.steps} steps "
        f"of {args.batch} x {args.seq_len} tokens (equal steps and tokens), seed {args.seed}; "
        f"validation: {dense['validation_source'] if dense else '?'}, "
        f"{dense['validation_tokens'] if dense else '?'} tokens (never trained on). "
        "Parameters: whole model, and the targeted block matrices as a share of dense. "
        "Peak memory: "
        + (dense["peak_memory_kind"] if dense else "?")
        + "; optimizer: bytes of the optimizer state tensors.",
        "",
    ]
    for ratio in args.ratios:
        lines += [
            f"## Budget: `--param-ratio {ratio:g}`",
            "",
            "| method | val. ppl | vs dense | params | targets | peak MiB | optimizer MiB "
            "| tokens/s | wall s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, s in runs.items():
            if key != "dense" and not key.endswith(f"@{ratio:g}"):
                continue
            delta = f"{s['perplexity'] / dense['perplexity'] - 1:+.1%}" if dense else "-"
            if "cut_from" in s:
                key += f" (cut from {s['cut_from']})"
            p = s["params"]
            lines.append(
                f"| {key} | {s['perplexity']:.2f} | {delta} | {p['model']:,} | "
                f"{p['final_ratio']:.1%} | {_mib(s['peak_memory_bytes'])} | "
                f"{_mib(s['optimizer_state_bytes'])} | {s['tokens_per_s']:,.0f} | "
                f"{s['wall_s']:.0f} |"
            )
        lines.append("")
    lines += ["## Targets", ""]
    if dense:
        for (method, ratio), allowed in TARGETS.items():
            s = runs.get(f"{method}@{ratio:g}")
            if s:
                rel = s["perplexity"] / dense["perplexity"] - 1
                ok = "met" if rel <= allowed else "not met"
                lines.append(
                    f"- `{method}` at {ratio:g} within {allowed:.0%} of dense: {rel:+.1%} ({ok})"
                )
        for ratio in args.ratios:
            s = runs.get(f"galore@{ratio:g}")
            if s:
                rel = s["perplexity"] / dense["perplexity"] - 1
                less = s["optimizer_state_bytes"] < dense["optimizer_state_bytes"]
                ok = "met" if rel <= 0.05 and less else "not met"
                lines.append(
                    f"- `galore` at {ratio:g} (rank {s['finalize'].get('projection_rank')}) "
                    f"within 5% of dense with less optimizer memory: {rel:+.1%}, "
                    f"{_mib(s['optimizer_state_bytes'])} vs {_mib(dense['optimizer_state_bytes'])}"
                    f" MiB ({ok})"
                )
    for ratio in args.ratios:
        s = runs.get(f"trp@{ratio:g}")
        if s:
            before, after = s["perplexity_before_finalize"], s["perplexity"]
            rel = after / before - 1
            ok = "met" if abs(rel) <= 0.02 else "not met"
            lines.append(
                f"- `trp` at {ratio:g}: {before:.2f} before factorization, {after:.2f} after "
                f"({rel:+.1%}; target within 2%: {ok}); ranks reached: {_ranks(s['finalize'])}"
            )
    lines.append("")
    if maestro:
        lines += [
            "## Maestro: one model cut at 8 ranks against post-hoc SVD of dense",
            "",
            "Maestro trained at full rank (one run, `maestro@full`), each matrix cut to the "
            "fraction of its full rank (`maestro_cut`, the authors' ceil rounding); "
            "truncated SVD and SVD-LLM (calibrated on "
            f"{args.calib_samples} x {args.seq_len} training tokens) of the dense run at the "
            f"same ranks. Dense: perplexity {maestro['dense']['perplexity']:.2f}, "
            f"{maestro['dense']['params']:,} parameters. Plot: `{args.name}-maestro.png`.",
            "",
            "| rank | maestro ppl | params | svd ppl | params | svd-llm ppl | params |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, fraction in enumerate(maestro["cuts"]):
            cells = " | ".join(
                f"{maestro[k][i]['perplexity']:.2f} | {maestro[k][i]['params']:,}"
                for k in ("maestro", "svd", "svd-llm")
            )
            lines.append(f"| {fraction:.0%} | {cells} |")
        wins = [
            maestro["maestro"][i]["perplexity"]
            < min(maestro["svd"][i]["perplexity"], maestro["svd-llm"][i]["perplexity"])
            for i, f in enumerate(maestro["cuts"])
            if f <= 0.5
        ]
        lines += [
            "",
            f"Target (Maestro better at every rank <= 50%): "
            f"{'met' if all(wins) else 'not met'} ({sum(wins)} of {len(wins)}).",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    write_keeping_readings(RESULTS / f"{args.name}.md", text)
    payload = {"args": {k: v for k, v in vars(args).items()}, "runs": runs, "maestro": maestro}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")

    fig, axes = plt.subplots(1, len(args.ratios), figsize=(6 * len(args.ratios), 4), squeeze=False)
    for ax, ratio in zip(axes[0], args.ratios, strict=True):
        for key, s in runs.items():
            if key != "dense" and not key.endswith(f"@{ratio:g}"):
                continue
            steps = [v["step"] for v in s["validation"]]
            # a cut run's curve is the uncut model's (it is cut after training)
            label = f"{s['cut_from']} (uncut)" if "cut_from" in s else key
            ax.plot(steps, [v["loss"] for v in s["validation"]], marker=".", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"--param-ratio {ratio:g}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=100)
    if maestro:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in ("maestro", "svd", "svd-llm"):
            ax.plot([v["params"] for v in maestro[k]], [v["perplexity"] for v in maestro[k]],
                    marker="o", label=k)  # fmt: skip
        ax.axhline(maestro["dense"]["perplexity"], color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (whole model)")
        ax.set_ylabel("validation perplexity")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{args.name}-maestro.png", dpi=100)


if __name__ == "__main__":
    main()
