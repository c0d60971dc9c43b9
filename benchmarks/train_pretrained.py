"""Train a pretrained model into low rank, or compress it after training?

Usage:
    .venv/bin/python benchmarks/train_pretrained.py [--model smollm2-135m] [--ratio 0.4]
        [--steps-trp 40] [--steps-maestro 30] [--batch 4] [--seq-len 128]
        [--data shakespeare] [--quality-data shakespeare-heldout /tmp/fortunes.txt]
        [--runs runs/bench-pretrained] [--reuse] [--name train_pretrained]

The users' second question: does training (or fine-tuning) a pretrained model so that it
becomes low rank beat compressing it after training? At one budget (``--ratio 0.4``
removes 40% of the targeted block parameters, so the trained methods get
``--param-ratio 0.6``), each a fresh process, one at a time:

1. ``rankcut train --model M --method trp --param-ratio 0.6 --steps N ...``: dense
   fine-tuning with TRP's energy truncation (capped at the budget's rank) and nuclear
   norm, factorized at the end;
2. the same with ``--method maestro`` (ordered full-rank factors from the SVD of each
   weight, cut to the budget at the end);
3. ``rankcut compress --model M --ratio 0.4`` (the training-free default recipe);
4. 3. followed by ``rankcut finetune`` on the same training text for the wall time
   the TRP run trained (its steps sized from a short probe of the finetune's speed).

Every output is then scored with ``rankcut eval OUT --data TEXT --tokens 4096``
(windows of 512) on each ``--quality-data`` text. The training text is the built-in
``shakespeare`` (its training works; ``shakespeare-heldout`` is disjoint), so the
Shakespeare column is in-domain for the trained methods and the finetune, and fortunes
(``benchmarks/fortunes_text.py``) is not. Writes benchmarks/results/NAME.md and .json.
Time it alone on the machine: the runs are sized by wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from _results import write_keeping_readings  # (benchmarks/ is the script folder)

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
#: The issue's limit on each training run's wall time (2 CPU cores).
LIMIT_S = 15 * 60


def rankcut(args: list[str]) -> tuple[float, str]:
    """Run the CLI in a fresh process; (wall seconds, stdout)."""
    cmd = [sys.executable, "-m", "rankcut", "-q", *args]
    print("$ rankcut " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"failed ({proc.returncode}): rankcut {' '.join(args)}\n{proc.stderr[-3000:]}"
        )
    return wall, proc.stdout


def meta(out: Path) -> dict:
    return json.loads((out / "rankcut.json").read_text())


def done(out: Path, reuse: bool) -> bool:
    if reuse and (out / "rankcut.json").is_file():
        print(f"reusing {out}", flush=True)
        return True
    return False


def train(args, method: str, steps: int, out: Path) -> dict:
    if not done(out, args.reuse):
        rankcut(
            [
                "train", "--model", args.model, "--method", method, "--data", args.data,
                "--param-ratio", f"{1 - args.ratio:g}", "--steps", str(steps),
                "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                "--eval-every", "0", "--eval-tokens", str(args.tokens),
                "--checkpoint-every", "0", "--seed", str(args.seed),
                "--out", str(out), "--overwrite",
            ]
        )  # fmt: skip
    t = meta(out)["training"]
    return {
        "label": f"train {method}",
        "command": f"rankcut train --model {args.model} --method {method} --data {args.data} "
        f"--param-ratio {1 - args.ratio:g} --steps {steps} --batch {args.batch} "
        f"--seq-len {args.seq_len}",
        "steps": t["steps"],
        "tokens": t["tokens"],
        "train_s": round(t["train_s"], 1),
        "wall_s": round(t["wall_s"], 1),
        "targets_ratio": round(t["params"]["final_ratio"], 4),
        "validation_before_finalize": t.get("perplexity_before_finalize"),
        "validation_after_finalize": t.get("perplexity"),
        "out": str(out),
    }


def compress(args, out: Path) -> dict:
    wall = None
    if not done(out, args.reuse):
        wall, _ = rankcut(
            ["compress", "--model", args.model, "--ratio", str(args.ratio), "--seed",
             str(args.seed), "--out", str(out), "--overwrite"]
        )  # fmt: skip
    m = meta(out)
    params = m.get("params", {})
    before, after = params.get("targeted_before"), params.get("targeted_after")
    return {
        "label": "compress (default recipe)",
        "command": f"rankcut compress --model {args.model} --ratio {args.ratio}",
        "wall_s": round(wall, 1) if wall is not None else None,
        "compression_s": round(float(m.get("compression_seconds", 0.0)), 1),
        "targets_ratio": round(after / before, 4) if before and after else None,
        "out": str(out),
    }


def finetune(args, source: Path, seconds: float, work: Path) -> dict:
    """``rankcut finetune`` of the compressed ``source`` for about ``seconds`` of training."""
    out = work / "compress-finetune"
    if not done(out, args.reuse):
        probe = work / "finetune-probe"
        rankcut(
            ["finetune", str(source), "--out", str(probe), "--overwrite", "--data", args.data,
             "--steps", str(args.probe_steps), "--seed", str(args.seed)]
        )  # fmt: skip
        per_step = meta(probe)["recovery"]["seconds"] / args.probe_steps
        steps = max(1, round(seconds / per_step))
        print(f"finetune: {per_step:.2f} s/step in the probe -> {steps} steps", flush=True)
        rankcut(
            ["finetune", str(source), "--out", str(out), "--overwrite", "--data", args.data,
             "--steps", str(steps), "--seed", str(args.seed)]
        )  # fmt: skip
    rec = meta(out)["recovery"]
    steps = rec["config"].get("steps")
    return {
        "label": "compress + finetune (same training time as trp)",
        "command": f"rankcut finetune OUT --data {args.data} --steps {steps}",
        "steps": steps,
        "train_s": round(rec["seconds"], 1),
        "out": str(out),
    }


def quality(out: str, data: list[str], tokens: int) -> dict[str, float]:
    result = {}
    for text in data:
        _, stdout = rankcut(["eval", out, "--data", text, "--tokens", str(tokens), "--json"])
        result[text] = round(json.loads(stdout.strip().splitlines()[-1])["perplexity"], 3)
    return result


def render(rows: list[dict], dense: dict, args) -> str:
    texts = args.quality_data
    lines = [
        f"# {args.name}: low rank by training a pretrained model, or after training",
        "",
        f"Model `{args.model}`, budget: {args.ratio:.0%} of the targeted block parameters "
        f"removed (`--param-ratio {1 - args.ratio:g}` for the trained methods). Training "
        f"text `{args.data}` (its training works), batch {args.batch} x {args.seq_len} "
        f"tokens per step for `rankcut train`. Perplexity: `rankcut eval OUT --data TEXT "
        f"--tokens {args.tokens}` (windows of 512). Written by `benchmarks/train_pretrained.py` "
        f"on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({platform.machine()}, "
        f"{os.cpu_count()} CPUs), one job at a time with nothing else running.",
        "",
        "| run | steps | training s | targets kept | "
        + " | ".join(f"ppl `{t}`" for t in texts)
        + " | command |",
        "|---" * (5 + len(texts)) + "|",
        "| dense | - | - | 1.0 | "
        + " | ".join(f"{dense[t]:.2f}" for t in texts)
        + f" | `rankcut eval {args.model}` |",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row.get('steps', '-')} | {row.get('train_s', '-')} | "
            f"{row.get('targets_ratio') or '-'} | "
            + " | ".join(f"{row['perplexity'][t]:.2f}" for t in texts)
            + f" | `{row['command']}` |"
        )
    lines.append("")
    scored = [r for r in rows if r.get("perplexity")]
    for t in texts:
        best = min(scored, key=lambda r: r["perplexity"][t])
        lines.append(f"- Best on `{t}`: {best['label']} ({best['perplexity'][t]:.2f}).")
    for row in rows:
        if row.get("validation_before_finalize") is not None:
            lines.append(
                f"- {row['label']}: validation perplexity ({args.tokens} tokens of "
                f"`shakespeare-heldout`) {row['validation_before_finalize']:.2f} before the "
                f"final factorization, {row['validation_after_finalize']:.2f} after; "
                f"training {row['train_s']} s (limit {LIMIT_S} s: "
                f"{'within' if row['train_s'] <= LIMIT_S else 'OVER'})."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--steps-trp", type=int, default=40)
    parser.add_argument("--steps-maestro", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument(
        "--quality-data", nargs="+", default=["shakespeare-heldout", "/tmp/fortunes.txt"]
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-steps", type=int, default=4, help="finetune speed probe")
    parser.add_argument("--runs", default="runs/bench-pretrained")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --runs")
    parser.add_argument("--name", default="train_pretrained")
    args = parser.parse_args()
    work = Path(args.runs)
    work.mkdir(parents=True, exist_ok=True)
    rows = [
        train(args, "trp", args.steps_trp, work / "trp"),
        train(args, "maestro", args.steps_maestro, work / "maestro"),
        compress(args, work / "compress"),
    ]
    rows.append(finetune(args, Path(rows[2]["out"]), rows[0]["train_s"], work))
    for row in rows:  # after every timed run
        row["perplexity"] = quality(row["out"], args.quality_data, args.tokens)
        print(f"{row['label']}: {row['perplexity']}", flush=True)
    dense = quality(args.model, args.quality_data, args.tokens)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"dense": dense, "rows": rows, "args": vars(args)}, indent=1) + "\n"
    )
    text = render(rows, dense, args)
    write_keeping_readings(RESULTS / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
