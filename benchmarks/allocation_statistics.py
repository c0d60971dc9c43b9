"""How much the global allocation moves when its statistics take fewer windows.

Usage:
    .venv/bin/python benchmarks/allocation_statistics.py [--windows 8] [--ratios 0.2 0.4]

Gathers the allocation's whole-model statistics of SmolLM2-135M (Gram matrices and
output Fisher, the default `auto` calibration of 32 x 512 tokens, from the cache) once
on every window and once on the first ``--windows``, then plans the default recipe
(svd-llm, global allocation, sequential pipeline) from each combination: Gram and
Fisher on all windows (the reference), both on the subset, only the Fisher on the
subset, only the Gram on the subset. Prints and writes
benchmarks/results/allocation_statistics.md: per combination, the sum over matrices of
``|rank - reference rank|`` against the sum of the reference ranks, and the net change
per kind of matrix. Decides what ``fisher_tokens`` subsamples (see
``rankcut.pipelines.plan.fisher_windows``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    args = parser.parse_args()

    from rankcut import io
    from rankcut.calibrate import collect_layer_stats
    from rankcut.calibrate.stats import LayerStats
    from rankcut.data.generated import resolve_spec, windows_from_spec
    from rankcut.methods import SvdLlmConfig
    from rankcut.pipelines.plan import make_plan, select_targets

    model = io.load(args.model)
    tok = io.load_tokenizer(args.model)
    calib = windows_from_spec(resolve_spec("auto", model), tok, 32, 512, 0, model=model)
    modules, _, _ = select_targets(model, SvdLlmConfig(pipeline="sequential"))
    needs = frozenset({"gram", "fisher_out"})
    t0 = time.perf_counter()
    full = collect_layer_stats(model, modules, calib, needs, progress=False)
    t1 = time.perf_counter()
    sub = collect_layer_stats(model, modules, calib[: args.windows], needs, progress=False)
    t2 = time.perf_counter()

    def mix(gram, fisher):
        return {
            n: LayerStats(inputs=gram[n].inputs, fisher_out=fisher[n].fisher_out) for n in modules
        }

    n = args.windows
    combos = {
        "Gram and Fisher on all 32 (reference)": full,
        f"Gram and Fisher on {n}": sub,
        f"Gram on 32, Fisher on {n}": mix(full, sub),
        f"Gram on {n}, Fisher on 32": mix(sub, full),
    }
    lines = [
        "# allocation_statistics: ranks of the global allocation from subsampled statistics",
        "",
        f"`benchmarks/allocation_statistics.py --windows {n}`; statistics on 32 windows "
        f"took {t1 - t0:.1f} s, on {n} windows {t2 - t1:.1f} s.",
        "",
        "| ratio | statistics | sum abs rank change | of reference sum | net change per kind |",
        "|---|---|---|---|---|",
    ]
    for ratio in args.ratios:
        config = SvdLlmConfig(ratio=ratio, pipeline="sequential")
        ranks = {k: make_plan(model, config, calib, stats=st, progress=False).ranks
                 for k, st in combos.items()}  # fmt: skip
        ref = ranks["Gram and Fisher on all 32 (reference)"]
        for label, r in ranks.items():
            moved = sum(abs(r[m] - ref[m]) for m in ref)
            kinds: dict[str, int] = {}
            for m in ref:
                kind = m.rsplit(".", 1)[-1]
                kinds[kind] = kinds.get(kind, 0) + r[m] - ref[m]
            per_kind = ", ".join(f"{k} {v:+d}" for k, v in kinds.items())
            lines.append(
                f"| {ratio} | {label} | {moved} | {moved / sum(ref.values()):.1%} | {per_kind} |"
            )
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "allocation_statistics.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
