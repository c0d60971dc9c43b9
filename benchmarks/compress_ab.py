"""compress_ab: two versions of the default ``rankcut compress`` timed in alternation.

One run of ``compress_time.py`` times each command once, and this VM's speed drifts by
10-20% within minutes (the same forward pass has measured 33-43 s in one session), so a
single before/after pair can invert a small gain. This script runs, round after round,
the forward pass and the compress of each version one after the other and reports every
run and the median per version, each ratio against the median forward pass.

    .venv/bin/python benchmarks/compress_ab.py --before-src /tmp/s12/src --rounds 3

Both versions must cache their calibration windows (it times the cached runs: keep the
cache warm with one compress first). Writes ``benchmarks/results/compress_ab.md`` + JSON.
Run it on a quiet machine, one job at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from _results import write_keeping_readings
from compress_time import PHASES, RESULTS, _check_source, _commit, compress, forward_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--before-src", required=True, help="src/ folder of the older version")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="compress_ab")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="compress-ab-"))
    versions = {"before": args.before_src, "after": None}
    info = {
        v: {"source": _check_source(src), "commit": _commit(src)} for v, src in versions.items()
    }
    runs: list[dict] = []
    forward: list[float] = []
    for i in range(args.rounds):
        forward.append(
            round(forward_pass(args.model, args.samples * args.seq_len, args.seq_len), 1)
        )
        print(f"round {i + 1}: forward pass {forward[-1]:.1f} s", flush=True)
        order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
        for version in order:
            out = work / f"{version}-{i}"
            row = compress(
                args.model, args.ratio, args.samples, args.seq_len, out, versions[version]
            )
            runs.append({"round": i + 1, "version": version, **row})
            print(f"round {i + 1}: {version} {row['wall']:.1f} s {row['phases']}", flush=True)

    fwd = statistics.median(forward)
    lines = [
        f"# {args.name}: two versions of the default compress, timed in alternation",
        "",
        f"Command: `rankcut compress --model {args.model} --ratio {args.ratio} --samples "
        f"{args.samples} --seq-len {args.seq_len}` (calibration windows cached), a fresh "
        f"process each; each round times the forward pass (`rankcut eval {args.model} "
        f"--tokens {args.samples * args.seq_len} --seq-len {args.seq_len}`) and then both "
        "versions, in alternating order. Measured one job at a time with nothing else "
        f"running, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} "
        f"CPU, {os.cpu_count()} cores.",
        "",
        "| version (commit) | round | " + " | ".join(PHASES) + " | wall (s) |",
        "|---" * (3 + len(PHASES)) + "|",
    ]
    for row in runs:
        v = row["version"]
        lines.append(
            f"| {v} ({info[v]['commit']}) | {row['round']} | "
            + " | ".join(f"{row['phases'][k]:.1f}" for k in PHASES)
            + f" | {row['wall']:.1f} |"
        )
    lines += [
        "",
        f"Forward passes: {', '.join(f'{f:.1f}' for f in forward)} s (median {fwd:.1f} s).",
        "",
        "| version | median wall (s) | range (s) | median x forward |",
        "|---|---|---|---|",
    ]
    summary = {}
    for v in versions:
        walls = [r["wall"] for r in runs if r["version"] == v]
        med = statistics.median(walls)
        summary[v] = {"median_wall": med, "walls": walls, "x_forward": round(med / fwd, 2)}
        lines.append(
            f"| {v} ({info[v]['commit']}) | {med:.1f} | {min(walls):.1f}-{max(walls):.1f} "
            f"| {med / fwd:.2f}x |"
        )
    for v in versions:
        lines.append(f"\n- {v}: rankcut from `{info[v]['source']}`.")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "versions": info,
                "forward": forward,
                "runs": runs,
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    print(text)
    write_keeping_readings(RESULTS / f"{args.name}.md", text)


if __name__ == "__main__":
    main()
