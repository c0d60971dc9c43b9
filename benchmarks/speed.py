"""Speed of SmolLM2-135M compressed by SVD-LLM against the dense model.

Usage (one command; compressed models are made once and kept under ``runs/``):
    .venv/bin/python benchmarks/speed.py [--ratios 0.2 0.4] [--threads 2] [--repeats 5]

For each ratio: SVD-LLM with uniform ranks (32 x 512 Shakespeare calibration, seed 0)
saved to ``runs/bench-svdllm-RATIO`` unless it exists, then ``rankcut.evaluate.speed
.compare`` against the dense model in the same process, alternating model and baseline
runs and taking medians: 512-token prefill at batch 1, then 128 greedy decode steps at
batch 1 with the KV cache, plus the decoder linears alone (all 210 called in order on
random inputs shaped like a decode step and like the 512-token prefill). Writes
``benchmarks/results/speed.md`` and ``speed.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import rankcut
from rankcut.evaluate.speed import SpeedSettings, compare, format_comparison

RESULTS = Path(__file__).parent / "results"


def compressed(
    model_name: str, method: str, ratio: float, runs: Path, extra: dict, tag: str
) -> Path:
    """The compressed model's folder, compressing and saving it on first use."""
    from rankcut.data import calibration_windows, load_text
    from rankcut.methods import get_method

    spec = get_method(method)
    out = runs / f"bench-{method.replace('-', '')}{tag}-{ratio}"
    if (out / "rankcut.json").is_file():
        return out
    tok = rankcut.load_tokenizer(model_name)
    model = rankcut.load(model_name)
    calib = calibration_windows(load_text("shakespeare"), tok, 32, 512, 0) if spec.needs else None
    config = spec.config_cls(ratio=ratio, allocation="uniform", **extra)
    result = rankcut.compress(model, config, calib)
    print(result.summary(), flush=True)
    rankcut.save(result.model, out, tokenizer=tok, extra={"source_model": model_name})
    return out


def random_factorized(model_name: str, ratio: float, extra: dict):
    """The dense model with its targets replaced by ``LowRankLinear`` layers holding random
    factors at the ranks uniform allocation gives (with the same speed-aware post-step).

    Time does not depend on the factor values, only on the shapes: this measures the
    speed of any method's uniform compression without spending minutes on SVDs.
    """
    from rankcut.layers import LowRankLinear, dense_shape
    from rankcut.methods import SvdConfig
    from rankcut.models import find_targets
    from rankcut.models.structure import replace_module
    from rankcut.rank import AllocationInput, allocate

    model = rankcut.load(model_name)
    targets = find_targets(model)
    shapes = {name: dense_shape(module) for name, module in targets.items()}
    config = SvdConfig(ratio=ratio, allocation="uniform", **extra)  # validates the options
    inp = AllocationInput(
        shapes, ratio, rank_multiple=config.rank_multiple, min_speedup=config.min_speedup
    )
    torch.manual_seed(0)
    for name, rank in allocate("uniform", inp).items():
        if rank:
            m, n = shapes[name]
            bias = targets[name].bias is not None
            replace_module(model, name, LowRankLinear(n, m, rank, bias=bias))
    return model.eval()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument(
        "--method",
        default="svd-llm",
        help="factorization (speed depends only on the ranks, which uniform allocation "
        "makes the same for every method); 'random': random factors at those ranks, "
        "no SVD, no saving",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--linear-repeats", type=int, default=9)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default="runs", help="where compressed models are kept")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra config field for the compressed models (changes their folder name)",
    )
    parser.add_argument("--name", default="speed", help="results file stem")
    parser.add_argument("--note", default="", help="sentence added to the results file")
    args = parser.parse_args()

    extra = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.option)}
    tag = "".join(f"-{k}{v}" for k, v in sorted(extra.items()))
    torch.set_num_threads(args.threads)
    settings = SpeedSettings(
        batch=1,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        linear_repeats=args.linear_repeats,
        threads=args.threads,
    )
    dense = rankcut.load(args.model, device=args.device)
    rows = []
    for ratio in args.ratios:
        if args.method == "random":
            folder = "(random factors, not saved)"
            model = random_factorized(args.model, ratio, extra).to(args.device)
        else:
            folder = compressed(args.model, args.method, ratio, Path(args.runs), extra, tag)
            model = rankcut.load(folder, device=args.device)
        start = time.time()
        result = compare(model, dense, settings)
        result.update(ratio=ratio, folder=str(folder), wall_seconds=round(time.time() - start))
        print(f"\n== ratio {ratio} ({folder})\n{format_comparison(result)}", flush=True)
        rows.append(result)
        del model
        write(args, extra, rows)  # after every ratio: a cut-short run keeps what it measured
    print(f"\nwrote {RESULTS / args.name}.md and .json")


def write(args, extra: dict, rows: list[dict]) -> None:
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "command": command.strip(),
        "date": when,
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "device": args.device,
        "options": extra,
        "method": args.method,
    }
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n"
    )
    (RESULTS / f"{args.name}.md").write_text(render(meta, rows, args.note))


def render(meta: dict, rows: list[dict], note: str) -> str:
    s = rows[0]["settings"]
    lines = [
        f"# Speed: SmolLM2-135M compressed ({meta['method']}, uniform ranks) vs dense",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Measured {meta['date']} on {meta['cpu']} ({meta['device']}, {meta['threads']} "
        f"torch threads, torch {meta['torch']}), fp32. Batch {s['batch']}: prefill of "
        f"{s['prompt']} tokens; decode of {s['new_tokens']} tokens with the KV cache after "
        f"that prompt. Model and dense baseline alternate within each of {s['repeats']} "
        f"repeats (whole model) and {s['linear_repeats']} repeats (linears only); medians. "
        f"Method {meta['method']}, uniform ranks (32 x 512 Shakespeare calibration when "
        "the method needs one); speed depends only on the ranks ('random': random "
        "factors at exactly the ranks uniform allocation gives, to skip the SVDs)."
        + (f" Compressed with extra options {meta['options']}." if meta["options"] else "")
        + (f" {note}" if note else ""),
        "",
        "Theoretical speedup = dense multiply-adds per token / factorized ones "
        "(`r (m + n)` vs `m n` per matrix): *linears* over the decoder-block linears, "
        "*model* over all linears including the untouched LM head (attention scores, norms "
        "and the embedding lookup are not counted). Measured = dense seconds / compressed "
        "seconds (medians; *best*: the ratio of each model's fastest run, less "
        "sensitive to other jobs).",
        "",
        "| ratio | stat | theoretical linears | linears prefill | linears decode | "
        "prefill / theory | decode / theory | theoretical model | model prefill | "
        "model decode |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        th = r["theoretical"]
        # Prefill theory is taken at the prefill's token count (the same per token for
        # low-rank layers; results written before it existed hold only "theoretical").
        thp = r.get("theoretical_prefill", th)
        for stat, me in (("median", r["measured"]), ("best", r["measured_best"])):
            lines.append(
                f"| {r['ratio']} | {stat} | {th['linears']:.3f}x | "
                f"{me['linears_prefill']:.3f}x | {me['linears_decode']:.3f}x | "
                f"{me['linears_prefill'] / thp['linears']:.2f} | "
                f"{me['linears_decode'] / th['linears']:.2f} | {th['model']:.3f}x | "
                f"{me['prefill']:.3f}x | {me['decode']:.3f}x |"
            )
    lines += [
        "",
        "| ratio | model | prefill tok/s | decode tok/s | linears prefill ms | "
        "linears decode ms | peak mem growth MiB | param MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key in ("baseline", "model"):
            x = r[key]
            peak = x["peak_memory_bytes"]
            label = "dense" if key == "baseline" else "compressed"
            lines.append(
                f"| {r['ratio']} | {label} | {x['prefill_tokens_per_s']:,.0f} | "
                f"{x['decode_tokens_per_s']:.2f} | {1e3 * x['linears_prefill_seconds']:.1f} | "
                f"{1e3 * x['linears_decode_seconds']:.2f} | "
                f"{'n/a' if peak is None else f'{peak / 2**20:.1f}'} | "
                f"{x['param_bytes'] / 2**20:.1f} |"
            )
    lines += [
        "",
        "Peak memory growth: the process's peak resident set during the prefill + decode "
        "run over its resident set before it (weights of both models already loaded).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
