"""Wall time of each phase of the default ``rankcut compress``, against one forward pass.

Usage:
    .venv/bin/python benchmarks/compress_time.py [--versions before after]
        [--before-src /tmp/rankcut-before/src] [--ratios 0.2 0.4]
        [--samples 32] [--seq-len 512] [--quality-data shakespeare-heldout /tmp/fortunes.txt]
        [--name compress_time]

Each version runs ``rankcut compress --model smollm2-135m --ratio R --samples 32
--seq-len 512`` (the default recipe) as a fresh process and reads the phase times the
command writes into ``rankcut.json``. ``before`` is the code of another checkout (a git
worktree at the commit an optimisation starts from), put first on ``PYTHONPATH``; ``after``
is this checkout. For ``after`` the first command starts with the calibration-window cache
emptied and the command is then repeated, so both the cold and the cached time are shown.
Beside them: one forward pass over as many tokens as the calibration (``rankcut eval
smollm2-135m --tokens 16384 --seq-len 512``, model loading included), timed in the same
run. Held-out perplexity of every output is measured afterwards (load does not change it).

Timings are only meaningful on a quiet machine: run nothing else (not the test suite).
Results are merged into benchmarks/results/NAME.json (one entry per version) and the
Markdown table is rewritten from all entries, so ``before`` and ``after`` may be measured
in two invocations; each entry keeps its own forward-pass time and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _results import write_keeping_readings  # (benchmarks/ is the script folder)

from rankcut.cache import cache_dir

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PHASES = ["loading", "statistics", "allocation", "factorization"]
# as a user runs it (``python -m rankcut`` is the ``rankcut`` executable, ``rankcut.launch``)
CLI = ["-m", "rankcut"]


def _env(src: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _rankcut(args: list[str], src: str | None) -> tuple[float, str]:
    cmd = [sys.executable, *CLI, "-q", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(src), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _check_source(src: str | None) -> str:
    code = "import rankcut, sys; sys.stdout.write(rankcut.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(src), capture_output=True, text=True, check=True
    ).stdout
    return out


def forward_pass(model: str, tokens: int, seq_len: int) -> float:
    wall, _ = _rankcut(
        [
            "eval",
            model,
            "--data",
            "shakespeare-heldout",
            "--tokens",
            str(tokens),
            "--seq-len",
            str(seq_len),
        ],
        None,
    )
    return wall


def calibration_cache() -> Path:
    """The calibration cache the measured commands use (rankcut.cache: no torch import)."""
    return cache_dir() / "calibration"


def compress(model, ratio, samples, seq_len, out, src) -> dict:
    wall, stdout = _rankcut(
        [
            "compress",
            "--model",
            model,
            "--ratio",
            str(ratio),
            "--samples",
            str(samples),
            "--seq-len",
            str(seq_len),
            "--out",
            str(out),
            "--overwrite",
        ],
        src,
    )
    meta = json.loads((Path(out) / "rankcut.json").read_text())
    phases = meta.get("phases", {})
    return {
        "ratio": ratio,
        "wall": round(wall, 1),
        "phases": {k: round(float(phases.get(k, 0.0)), 1) for k in PHASES},
        "params": meta.get("params_total") or meta.get("params", {}).get("total"),
        "out": str(out),
        "stdout": stdout.strip().splitlines()[-6:],
    }


def quality(out: str, data: list[str], tokens: int) -> dict[str, float]:
    result = {}
    for text in data:
        _, stdout = _rankcut(["eval", out, "--data", text, "--tokens", str(tokens), "--json"], None)
        result[text] = round(json.loads(stdout.strip().splitlines()[-1])["perplexity"], 3)
    return result


def run_version(version, args, work: Path) -> dict:
    src = args.before_src if version == "before" else None
    source = _check_source(src)
    print(f"[{version}] rankcut from {source}", flush=True)
    fwd = forward_pass(args.model, args.samples * args.seq_len, args.seq_len)
    print(f"[{version}] forward pass {fwd:.1f} s", flush=True)
    runs = []
    if version == "after" and not args.cached_only:
        shutil.rmtree(calibration_cache(), ignore_errors=True)
    # (a ``before`` that caches windows itself, with --cached-only: the cache is kept)
    plan = [(r, "cached" if args.cached_only else "cold") for r in args.ratios]
    if version == "after":
        plan = [] if args.cached_only else [(args.ratios[0], "cold")]
        plan += [(r, "cached") for r in args.ratios]
    for ratio, cache in plan:
        out = work / f"{version}-{ratio}-{cache}"
        row = compress(args.model, ratio, args.samples, args.seq_len, out, src)
        row["calibration windows"] = cache
        row["x forward"] = round(row["wall"] / fwd, 2)
        print(
            f"[{version}] ratio {ratio} ({cache}): {row['wall']:.1f} s = "
            f"{row['x forward']}x forward; phases {row['phases']}",
            flush=True,
        )
        runs.append(row)
    for row in runs:  # after all timings: evaluation does not disturb them
        row["perplexity"] = quality(row["out"], args.quality_data, args.tokens)
        print(
            f"[{version}] ratio {row['ratio']} ({row['calibration windows']}): {row['perplexity']}",
            flush=True,
        )
    dense = quality(args.model, args.quality_data, args.tokens)
    return {
        "version": version,
        "source": source,
        "commit": _commit(src),
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "forward_pass_seconds": round(fwd, 1),
        "dense_perplexity": dense,
        "runs": runs,
    }


def retime(entry: dict, version: str, args, work: Path) -> None:
    """Time ``entry``'s cold runs at ``args.ratios`` again (same command, same output:
    the perplexities measured before stay), e.g. after a run was disturbed by load."""
    src = args.before_src if version == "before" else None
    for row in entry["runs"]:
        if row["ratio"] not in args.ratios or row["calibration windows"] != "cold":
            continue
        if version == "after":
            shutil.rmtree(calibration_cache(), ignore_errors=True)
        new = compress(
            args.model,
            row["ratio"],
            args.samples,
            args.seq_len,
            work / f"{version}-{row['ratio']}-retime",
            src,
        )
        row["disturbed"] = {"wall": row["wall"], "phases": row["phases"]}
        row.update(wall=new["wall"], phases=new["phases"], retimed=True)
        row["x forward"] = round(row["wall"] / entry["forward_pass_seconds"], 2)
        print(
            f"[{version}] ratio {row['ratio']} retimed: {row['wall']:.1f} s = "
            f"{row['x forward']}x forward; phases {row['phases']}",
            flush=True,
        )


def _commit(src: str | None) -> str:
    where = Path(src).parent if src else ROOT
    try:
        return subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "?"


def table(entries: dict, args) -> str:
    lines = [
        f"# {args.name}: default `rankcut compress` phase times against one forward pass",
        "",
        f"Command per row: `rankcut compress --model {args.model} --ratio R --samples "
        f"{args.samples} --seq-len {args.seq_len}` (default recipe: svd-llm, global allocation, "
        "sequential pipeline with refit, auto calibration), a fresh process each. Forward pass: "
        f"`rankcut eval {args.model} --tokens {args.samples * args.seq_len} --seq-len "
        f"{args.seq_len}` in the same run (model loading included). Phase times are the ones "
        "the command writes into `rankcut.json` (loading includes sampling the calibration "
        "windows). Perplexity: `rankcut eval OUT --data TEXT --tokens "
        f"{args.tokens}` (windows of 512).",
        "",
        "Measured one job at a time with nothing else running on the machine.",
        "",
        "| version (commit) | ratio | calibration windows | loading | statistics | allocation "
        "| factorization | wall (s) | forward pass (s) | x forward | "
        + " | ".join(f"ppl `{d}`" for d in args.quality_data)
        + " |",
        "|---" * (9 + len(args.quality_data)) + "|",
    ]
    notes: list[str] = []
    for name, entry in entries.items():  # in the order measured (an older "after" kept)
        dense = entry["dense_perplexity"]
        lines.append(
            "| dense | - | - | - | - | - | - | - | - | - | "
            + " | ".join(f"{dense.get(d, float('nan')):.2f}" for d in args.quality_data)
            + " |"
        )
        for row in entry["runs"]:
            p = row["phases"]
            ppl = row.get("perplexity", {})
            lines.append(
                f"| {name} ({entry['commit']}) | {row['ratio']} | {row['calibration windows']} | "
                + " | ".join(f"{p[k]:.1f}" for k in PHASES)
                + f" | {row['wall']:.1f} | {entry['forward_pass_seconds']:.1f} | "
                f"{row['x forward']:.2f}x | "
                + " | ".join(f"{ppl.get(d, float('nan')):.2f}" for d in args.quality_data)
                + " |"
            )
            if row.get("retimed"):
                d = row["disturbed"]
                notes.append(
                    f"- {name} ratio {row['ratio']}: timed again on a quiet machine; the "
                    f"first run ({d['wall']:.0f} s, statistics {d['phases']['statistics']:.0f} s, "
                    f"allocation {d['phases']['allocation']:.0f} s) shared the two cores with "
                    "other jobs and is not a measurement. Its output gave the perplexities."
                )
    lines.append("")
    lines += notes
    for name, entry in entries.items():
        lines.append(
            f"- {name}: measured {entry['date']} on {entry['machine']}; "
            f"rankcut from `{entry['source']}`."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--versions", nargs="+", default=["after"], choices=["before", "after"])
    parser.add_argument("--before-src", default="/tmp/rankcut-before/src")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096, help="perplexity tokens per text")
    parser.add_argument(
        "--quality-data", nargs="+", default=["shakespeare-heldout", "/tmp/fortunes.txt"]
    )
    parser.add_argument("--work", default=None, help="folder for the outputs (default: temporary)")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="keep the calibration-window cache and time only the cached runs (before: "
        "only for a version that caches its windows; its rows are labelled cached)",
    )
    parser.add_argument("--label", help="results key of this run (default: the version)")
    parser.add_argument("--name", default="compress_time")
    parser.add_argument(
        "--retime",
        action="store_true",
        help="time the cold runs of --versions at --ratios again (a run disturbed by load)",
    )
    args = parser.parse_args()

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    entries = json.loads(path.read_text()) if path.exists() else {}
    work = Path(args.work or tempfile.mkdtemp(prefix="compress-time-"))
    work.mkdir(parents=True, exist_ok=True)
    for version in args.versions:
        key = args.label or version
        if args.retime:
            retime(entries[key], version, args, work)
        else:
            entries[key] = run_version(version, args, work)
        path.write_text(json.dumps(entries, indent=2) + "\n")
    text = table(entries, args)
    print(text)
    write_keeping_readings(RESULTS / f"{args.name}.md", text)


if __name__ == "__main__":
    main()
