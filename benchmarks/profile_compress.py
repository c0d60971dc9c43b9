"""Where the default ``rankcut compress`` spends its time: a pyinstrument profile, before/after.

Usage:
    .venv/bin/pip install pyinstrument
    .venv/bin/python benchmarks/profile_compress.py [--versions before after]
        [--before-src /tmp/rankcut-before/src] [--samples 32] [--seq-len 512]
        [--ratio 0.2] [--top 25] [--name compress_profile]

Each version runs ``rankcut compress --model smollm2-135m --ratio R --samples N
--seq-len L --out DIR --overwrite`` (the default recipe: svd-llm, global allocation,
sequential pipeline) in a fresh process under pyinstrument, the calibration windows
sampled afresh in each (``RANKCUT_CALIB_CACHE=0``). ``before`` is the code of
another checkout (a git worktree at the commit the optimisation starts from), put first
on ``PYTHONPATH``; ``after`` is this checkout. The calibration is the recipe's 32 x 512
by default; ``--calib shakespeare`` leaves the sampling of windows out (what a second
run with cached windows does not pay); a smaller ``--samples``/``--seq-len`` keeps a
profile short, at the cost of a ranking closer to the fixed per-matrix costs.
Writes benchmarks/results/NAME.md: per version the phase times the command wrote into
``rankcut.json`` and the top functions by cumulative time (a function's time counted once per call stack, recursion included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# Runs in the child: the CLI under pyinstrument; the aggregated profile as JSON on stdout's
# last line (the CLI's own output goes before it).
CHILD = r"""
import json, sys
from pyinstrument import Profiler
import rankcut
from rankcut.cli import main

profiler = Profiler(interval=0.005)
profiler.start()
try:
    code = main(sys.argv[1:])
finally:
    profiler.stop()
root = profiler.last_session.root_frame()
total = root.time
cum, own = {}, {}

def walk(frame, active):
    if frame.is_synthetic:  # "[self]" and await frames: their time is their parent's
        return
    key = f"{frame.function} ({frame.file_path_short}:{frame.line_no})"
    own[key] = own.get(key, 0.0) + frame.total_self_time
    if key not in active:  # a recursive call's time is already in its outer call's
        cum[key] = cum.get(key, 0.0) + frame.time
    for child in frame.children:
        walk(child, active | {key})

walk(root, frozenset())
print(json.dumps({"total": total, "cum": cum, "own": own, "rankcut": rankcut.__file__,
                  "code": code}))
"""


def _env(src: str | None) -> dict[str, str]:
    env = dict(os.environ)
    # Equal terms: every version samples its calibration windows (the cache of sampled
    # windows, where the code has one, is off), so "loading" holds the same work.
    env["RANKCUT_CALIB_CACHE"] = "0"
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def profile(version: str, src: str | None, args: argparse.Namespace) -> dict:
    """Profile one compress of ``version`` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cli = ["compress", "--model", args.model, "--ratio", str(args.ratio)]
        cli += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        if args.calib:
            cli += ["--calib", args.calib]
        cli += ["--out", str(out), "--overwrite"]
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, *cli], env=_env(src), capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{version} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        meta = json.loads((out / "rankcut.json").read_text())
    data["phases"] = meta.get("phases") or {}
    data["ranks"] = meta.get("ranks") or {}
    data["command"] = "rankcut " + " ".join(cli).replace(str(out), "/tmp/x")
    data["version"] = version
    data["src"] = src or str(ROOT / "src")
    return data


def _top(data: dict, key: str, n: int) -> list[tuple[str, float]]:
    return sorted(data[key].items(), key=lambda kv: -kv[1])[:n]


def render(runs: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Profile of the default `rankcut compress`",
        "",
        f"Written by `benchmarks/profile_compress.py` on {runs[0]['date']} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, torch threads as the CLI sets them).",
        "",
        (
            "**The machine was shared** with other jobs while these ran: the seconds are "
            "indicative only; the ranking of the entries is what matters."
            if args.shared
            else "Profiled one job at a time with nothing else running on the machine."
        )
        + f" Calibration: {args.samples} x {args.seq_len} tokens (the recipe's default is "
        "32 x 512)" + (f", `--calib {args.calib}`." if args.calib else "."),
        "",
    ]
    if len(runs) > 1:
        same = all(run["ranks"] == runs[0]["ranks"] for run in runs[1:])
        lines += [
            "Ranks written by the versions (`ranks` of `rankcut.json`): "
            + ("identical" if same else "**different**")
            + f" ({len(runs[0]['ranks'])} matrices).",
            "",
        ]
    for run in runs:
        lines += [
            f"## {run['version']}",
            "",
            f"`{run['command']}` with `{run['src']}` first on the path "
            f"(rankcut imported from `{run['rankcut']}`).",
            "",
            f"Profiled wall time {run['total']:.1f} s. Phases written by the command: "
            + (", ".join(f"{k} {float(v):.1f} s" for k, v in run["phases"].items()) or "none")
            + ".",
            "",
            "| function (file:line) | cumulative s | % | own s |",
            "|---|---:|---:|---:|",
        ]
        for name, sec in _top(run, "cum", args.top):
            pct = 100 * sec / run["total"] if run["total"] else 0.0
            lines.append(f"| `{name}` | {sec:.2f} | {pct:.1f} | {run['own'].get(name, 0.0):.2f} |")
        lines += ["", "Largest own (self) time:", "", "| function | own s | % |", "|---|---:|---:|"]
        for name, sec in _top(run, "own", 12):
            pct = 100 * sec / run["total"] if run["total"] else 0.0
            lines.append(f"| `{name}` | {sec:.2f} | {pct:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=["before", "after"])
    parser.add_argument("--before-src", default="/tmp/rankcut-before/src")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--calib",
        default=None,
        help="calibration data (default: the recipe's, 'auto': windows sampled from the "
        "model); e.g. 'shakespeare' to leave the sampling out of the profile",
    )
    parser.add_argument(
        "--shared", action="store_true", help="say that other jobs shared the machine"
    )
    parser.add_argument("--label", help="name of the profiled version in the results")
    parser.add_argument("--name", default="compress_profile")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of NAME.md")
    args = parser.parse_args()
    runs = []
    for version in args.versions:
        src = args.before_src if version == "before" else None
        print(f"profiling {version} ...", flush=True)
        run = profile(version, src, args)
        if args.label:
            run["version"] = args.label
        run["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"  {run['total']:.1f} s, phases {run['phases']}", flush=True)
        runs.append(run)
    args.results.mkdir(parents=True, exist_ok=True)
    raw = args.results / f"{args.name}.runs.json"
    # Merge with the runs of earlier invocations (a run of the same label is replaced), so
    # that versions profiled at different times share one table.
    earlier = json.loads(raw.read_text()) if raw.exists() else []
    labels = {run["version"] for run in runs}
    runs = [run for run in earlier if run["version"] not in labels] + runs
    raw.write_text(json.dumps(runs) + "\n")
    (args.results / f"{args.name}.md").write_text(render(runs, args))
    print(f"wrote {args.results / (args.name + '.md')}")


if __name__ == "__main__":
    main()
