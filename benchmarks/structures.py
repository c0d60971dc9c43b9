"""Structures beyond one low-rank product: reconstruction error, speed, perplexity.

Usage:
    PYTHONPATH=src .venv/bin/python benchmarks/structures.py errors [--layers 3 15 27]
        [--modules q_proj k_proj o_proj gate_proj down_proj] [--samples 32] [--seq-len 512]
        [--fractions 0.25 0.5 0.75] [--variants kronecker ...]
    PYTHONPATH=src .venv/bin/python benchmarks/structures.py speed [--repeats 30]
    PYTHONPATH=src .venv/bin/python benchmarks/structures.py ppl [--ratios 0.2 0.4]
        [--methods svd-llm cur kronecker svd-sparse dense-sparse dictionary] [--tokens 4096]
        [--calib shakespeare] [--pipeline whole] [--data shakespeare-heldout FILE.txt]
    PYTHONPATH=src .venv/bin/python benchmarks/structures.py report

``errors`` (a): real SmolLM2-135M matrices with real calibration statistics (Gram of
their inputs over ``samples x seq-len`` tokens of ``shakespeare``): the whitened
relative error ``||(W - W') S||_F / ||W S||_F`` (``S S^T = X^T X``) of every structure at
25/50/75% (``--fractions``) of the dense parameter count (index storage included), against
``svd-llm``.
``speed`` (c): forward time of each layer type at batch 1 and batch 512 relative to the
dense ``nn.Linear``, float32 on the CPU. ``ppl`` (b): the whole model compressed with
each method at uniform ranks from one shared set of calibration statistics, held-out
perplexity on each ``--data`` text. Each step stores its part in ``benchmarks/results/structures.json``;
``report`` (also run after each step) writes ``benchmarks/results/structures.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
JSON = RESULTS / "structures.json"
MD = RESULTS / "structures.md"
FRACTIONS = (0.25, 0.5, 0.75)

#: (label, method, options) rows of the error table; svd-sparse's split is swept.
VARIANTS = [
    ("svd-llm", "svd-llm", {}),
    ("cur", "cur", {}),
    ("kronecker", "kronecker", {}),
    ("svd-sparse share=0.1", "svd-sparse", {"sparse_share": 0.1}),
    ("svd-sparse share=0.25", "svd-sparse", {"sparse_share": 0.25}),
    ("svd-sparse share=0.5", "svd-sparse", {"sparse_share": 0.5}),
    ("dense-sparse 2:4", "dense-sparse", {"n_of_m": "2:4"}),
    ("dictionary density=0.5", "dictionary", {"density": 0.5}),
]


def load_results() -> dict:
    return json.loads(JSON.read_text()) if JSON.exists() else {}


def store(section: str, data) -> None:
    results = load_results()
    results[section] = data
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON.write_text(json.dumps(results, indent=1) + "\n")


def recorded_commands(data: dict) -> list[str]:
    """The commands whose rows a stored section holds (older files kept one ``command``)."""
    return data.get("commands", [data["command"]] if "command" in data else [])


def command_line() -> str:
    return "PYTHONPATH=src .venv/bin/python benchmarks/structures.py " + " ".join(sys.argv[1:])


# -- (a) reconstruction error ---------------------------------------------------------
def run_errors(args) -> None:
    import rankcut
    from rankcut.calibrate import collect_layer_stats
    from rankcut.data import calibration_windows, load_text
    from rankcut.layers import dense_weight
    from rankcut.methods import METHODS

    torch.manual_seed(0)
    tok = rankcut.load_tokenizer(args.model)
    model = rankcut.load(args.model)
    calib = calibration_windows(load_text("shakespeare"), tok, args.samples, args.seq_len, 0)
    names = [
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
        for i in args.layers
        for p in args.modules
    ]
    modules = {n: model.get_submodule(n) for n in names}
    start = time.perf_counter()
    stats = collect_layer_stats(model, modules, calib, frozenset({"gram"}), progress=True)
    print(f"statistics: {time.perf_counter() - start:.0f} s", flush=True)
    # Rows measured earlier with the same calibration are kept unless this run redoes them.
    earlier = load_results().get("errors", {}) if not args.redo else {}
    same = (earlier.get("samples"), earlier.get("seq_len")) == (args.samples, args.seq_len)
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants]
    redone = {(n, f, v[0]) for n in names for f in args.fractions for v in variants}
    rows = [
        r
        for r in earlier.get("rows", [])
        if same and (r["module"], r["fraction"], r["variant"]) not in redone
    ]
    commands = [c for c in recorded_commands(earlier) if same and c != command_line()]
    for name in names:
        w = dense_weight(modules[name]).detach().to(torch.float64)
        m, n = w.shape
        chol = stats[name].inputs.cholesky(1e-6, name)
        base = float((w @ chol).norm())
        for frac in args.fractions:
            rank = math.floor(frac * m * n / (m + n))
            for label, method, options in variants:
                spec = METHODS[method]
                config = spec.config_cls(allocation="uniform", **options)
                t0 = time.perf_counter()
                with torch.no_grad():
                    layer = spec.make_layer(w, stats[name], rank, config, name, dtype=torch.float64)
                    approx = layer.weight_product()
                seconds = time.perf_counter() - t0
                err = float(((w - approx) @ chol).norm()) / base
                row = {
                    "module": name,
                    "shape": [m, n],
                    "fraction": frac,
                    "rank": rank,
                    "variant": label,
                    "method": method,
                    "params": layer.num_params(),
                    "dense": m * n,
                    "rel_error": err,
                    "seconds": round(seconds, 3),
                }
                rows.append(row)
                print(
                    f"{name:32s} {frac:.2f} {label:24s} err {err:.4f} "
                    f"params {row['params'] / (m * n):.3f} {seconds:.1f}s",
                    flush=True,
                )
        store(
            "errors",
            {  # after every matrix, so that an interrupted run keeps its rows
                "commands": [*commands, command_line()],
                "model": args.model,
                "samples": args.samples,
                "seq_len": args.seq_len,
                "rows": rows,
                "date": now(),
            },
        )


# -- (c) speed ---------------------------------------------------------------------------
def run_speed(args) -> None:
    from rankcut.calibrate import InputStats, LayerStats
    from rankcut.methods import METHODS

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, n in ((576, 1536), (1536, 576), (576, 576)):
        w = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64)
        inputs = InputStats(n)
        inputs.update(x)
        stats = LayerStats(inputs=inputs)
        rank = math.floor(0.5 * m * n / (m + n))
        dense = torch.nn.Linear(n, m, bias=False)
        layers = {"dense": dense}
        for label, method, options in VARIANTS:
            if label.startswith("svd-sparse") and "0.25" not in label:
                continue
            if label.startswith("dictionary") and "0.5" not in label:
                continue
            spec = METHODS[method]
            if method in ("dense-sparse", "dictionary", "svd-sparse"):
                options = {**options, "iters": 0}  # speed does not depend on the fit's quality
            config = spec.config_cls(allocation="uniform", **options)
            with torch.no_grad():
                layers[label] = spec.make_layer(w, stats, rank, config, "x", dtype=torch.float32)
        for batch in (1, 512):
            xb = torch.randn(batch, n)
            samples = {label: [] for label in layers}
            with torch.no_grad():
                for layer in layers.values():
                    layer(xb)  # warm-up
                # Round robin, best of ``repeats``: on a shared, loaded machine every layer
                # sees the same interference, and the minimum is the least disturbed run.
                for _ in range(args.repeats):
                    for label, layer in layers.items():
                        t0 = time.perf_counter()
                        layer(xb)
                        samples[label].append(time.perf_counter() - t0)
            times = {label: min(ts) for label, ts in samples.items()}
            for label, t in times.items():
                params = layers[label].num_params() if label != "dense" else m * n
                rows.append(
                    {
                        "shape": [m, n],
                        "batch": batch,
                        "layer": label,
                        "type": type(layers[label]).__name__,
                        "params": params,
                        "seconds": t,
                        "relative_to_dense": t / times["dense"],
                    }
                )
                print(
                    f"{m}x{n} batch {batch:4d} {label:24s} {t * 1e6:9.1f} us "
                    f"x{t / times['dense']:.2f}",
                    flush=True,
                )
    store(
        "speed",
        {
            "command": command_line(),
            "threads": args.threads,
            "repeats": args.repeats,
            "rows": rows,
            "date": now(),
        },
    )


# -- (b) perplexity ----------------------------------------------------------------------
def run_ppl(args) -> None:
    """Whole model, every method at the same uniform ranks and the same statistics.

    The calibration statistics (input Grams) are gathered once on the dense model and
    reused by every method and ratio, so methods differ only in their factorization.
    """
    import copy

    import rankcut
    from rankcut.data import load_text
    from rankcut.data.generated import windows_from_spec
    from rankcut.evaluate import param_summary, perplexity
    from rankcut.methods import METHODS, SvdLlmConfig

    results = load_results().get("perplexity", {"rows": []})
    rows = {(r["method"], r["ratio"]): r for r in results["rows"]}
    commands = [c for c in recorded_commands(results) if c != command_line()] + [command_line()]
    torch.manual_seed(0)
    tok = rankcut.load_tokenizer(args.model)
    dense = rankcut.load(args.model)
    texts = {name: load_text(name) for name in args.data}
    calib = windows_from_spec(args.calib, tok, args.samples, args.seq_len, 0, model=dense)

    def evaluate(model) -> dict[str, float]:
        return {
            name: perplexity(model, tok, text, tokens=args.tokens, progress=False)["perplexity"]
            for name, text in texts.items()
        }

    def save(row_key, row) -> None:
        rows[row_key] = row
        print(row, flush=True)
        store(
            "perplexity",
            {
                "commands": commands,
                "calib": args.calib,
                "pipeline": args.pipeline,
                "samples": args.samples,
                "seq_len": args.seq_len,
                "tokens": args.tokens,
                "data": args.data,
                "rows": list(rows.values()),
                "date": now(),
            },
        )
        write_report()

    if ("dense", None) not in rows or args.redo:
        params = param_summary(dense)["params_total"]
        save(
            ("dense", None),
            {
                "method": "dense",
                "ratio": None,
                "perplexity": evaluate(dense),
                "params_total": params,
                "compress_seconds": 0.0,
            },
        )
    t0 = time.perf_counter()
    needs = SvdLlmConfig(allocation="uniform", pipeline="whole")
    stats = rankcut.collect_statistics(dense, needs, calib, progress=False)
    print(f"statistics: {time.perf_counter() - t0:.0f} s", flush=True)
    for ratio in args.ratios:
        for method in args.methods:
            if (method, ratio) in rows and not args.redo:
                continue
            model = copy.deepcopy(dense)
            config = METHODS[method].config_cls(
                ratio=ratio, allocation="uniform", pipeline=args.pipeline
            )
            t0 = time.perf_counter()
            result = rankcut.compress(model, config, calib, stats=stats, progress=False)
            seconds = time.perf_counter() - t0
            save(
                (method, ratio),
                {
                    "method": method,
                    "ratio": ratio,
                    "perplexity": evaluate(model),
                    "params_total": result.params["model_after"],
                    "kept_dense": len(result.kept_dense),
                    "compress_seconds": round(seconds, 1),
                },
            )
            del model


# -- report ------------------------------------------------------------------------------
def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def error_table(data: dict) -> list[str]:
    rows = data["rows"]
    variants = [v for v, _, _ in VARIANTS if any(r["variant"] == v for r in rows)]
    modules = list(dict.fromkeys(r["module"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows})
    out = [
        "| structure | "
        + " | ".join(f"{f * 100:g}% (mean err / params)" for f in fractions)
        + " | wins vs svd-llm |",
        "|---|" + "---|" * (len(fractions) + 1),
    ]
    ref = {(r["module"], r["fraction"]): r["rel_error"] for r in rows if r["variant"] == "svd-llm"}
    ratio_rows = []
    for v in variants:
        cells, ratio_cells, wins, total = [], [], 0, 0
        for f in fractions:
            sel = [r for r in rows if r["variant"] == v and r["fraction"] == f]
            if not sel:
                cells.append("-")
                ratio_cells.append("-")
                continue
            ratios = [r["rel_error"] / ref[(r["module"], f)] for r in sel]
            ratio_cells.append(f"{statistics.mean(ratios):.2f}")
            err = statistics.mean(r["rel_error"] for r in sel)
            share = statistics.mean(r["params"] / r["dense"] for r in sel)
            cells.append(f"{err:.4f} / {share:.3f}")
            wins += sum(r["rel_error"] < ref[(r["module"], f)] - 1e-12 for r in sel)
            total += len(sel)
        out.append(f"| {v} | " + " | ".join(cells) + f" | {wins}/{total} |")
        ratio_rows.append(f"| {v} | " + " | ".join(ratio_cells) + " |")
    out += [
        "",
        "Mean over the matrices of each structure's error divided by `svd-llm`'s on the same "
        "matrix and budget (below 1: better than `svd-llm`):",
        "",
        "| structure | " + " | ".join(f"{f * 100:g}%" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
        *ratio_rows,
    ]
    out += ["", "Per matrix at 50% (relative whitened error):", ""]
    out.append("| module | shape | " + " | ".join(variants) + " |")
    out.append("|---|---|" + "---|" * len(variants))
    for mod in modules:
        sel = {r["variant"]: r for r in rows if r["module"] == mod and r["fraction"] == 0.5}
        shape = "x".join(map(str, next(iter(sel.values()))["shape"]))
        cells = [f"{sel[v]['rel_error']:.4f}" if v in sel else "-" for v in variants]
        out.append(f"| {mod.removeprefix('model.layers.')} | {shape} | " + " | ".join(cells) + " |")
    secs = {v: statistics.mean(r["seconds"] for r in rows if r["variant"] == v) for v in variants}
    out += [
        "",
        "Mean fitting time per matrix (s): " + ", ".join(f"{v} {s:.2f}" for v, s in secs.items()),
    ]
    return out


def speed_table(data: dict) -> list[str]:
    rows = data["rows"]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    labels = list(dict.fromkeys(r["layer"] for r in rows))
    head = [f"{m}x{n} b{b}" for m, n in shapes for b in (1, 512)]
    out = ["| layer (50% params) | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for label in labels:
        cells = []
        for m, n in shapes:
            for b in (1, 512):
                sel = [
                    r
                    for r in rows
                    if r["layer"] == label and tuple(r["shape"]) == (m, n) and r["batch"] == b
                ]
                cells.append(f"{sel[0]['relative_to_dense']:.2f}x" if sel else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    dense = {(tuple(r["shape"]), r["batch"]): r["seconds"] for r in rows if r["layer"] == "dense"}
    out += [
        "",
        "Dense times: "
        + ", ".join(f"{s[0]}x{s[1]} b{b} {t * 1e6:.0f} us" for (s, b), t in dense.items()),
    ]
    return out


def ppl_table(data: dict) -> list[str]:
    rows = data["rows"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    texts = data.get("data", ["shakespeare-heldout"])
    out = [
        f"Calibration `{data.get('calib')}` ({data['samples']} x {data['seq_len']} tokens), "
        f"statistics gathered once and shared; pipeline `{data.get('pipeline')}`, uniform "
        f"ranks; perplexity on the first {data['tokens']} tokens of "
        + ", ".join(f"`{t}`" for t in texts)
        + " (in that order).",
        "",
        "| method | "
        + " | ".join(f"ratio {r}: ppl (x dense), params, compress s" for r in ratios)
        + " |",
        "|---|" + "---|" * len(ratios),
    ]

    def ppl(row) -> str:
        return " / ".join(
            f"{row['perplexity'][t]:.2f}"
            + (f" ({row['perplexity'][t] / dense['perplexity'][t]:.2f}x)" if dense else "")
            for t in texts
        )

    if dense:
        out.append(
            f"| dense | {ppl(dense)}, {dense['params_total']:,} |" + " |" * (len(ratios) - 1)
        )
    for m in methods:
        cells = []
        for ratio in ratios:
            sel = [r for r in rows if r["method"] == m and r["ratio"] == ratio]
            cells.append(
                f"{ppl(sel[0])}, {sel[0]['params_total']:,}, {sel[0]['compress_seconds']:.0f}"
                if sel
                else "not run"
            )
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def write_report() -> None:
    results = load_results()
    lines = [
        "# Structures beyond one low-rank product",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads available, "
        f"torch {torch.__version__}, CPU.",
        "",
    ]
    notes = RESULTS / "structures_notes.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    for key, title, table in (
        ("errors", "(a) Whitened reconstruction error at equal parameter counts", error_table),
        ("perplexity", "(b) Held-out perplexity, whole model, uniform allocation", ppl_table),
        ("speed", "(c) Forward time relative to dense nn.Linear (float32, 1 thread)", speed_table),
    ):
        lines += [f"## {title}", ""]
        if key not in results:
            lines += ["not run", ""]
            continue
        data = results[key]
        commands = recorded_commands(data)
        lines += [
            "Command"
            + ("s" if len(commands) > 1 else "")
            + ": "
            + "; ".join(f"`{c}`" for c in commands)
            + f" (last run {data['date']})",
            "",
        ]
        lines += table(data) + [""]
    MD.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    e = sub.add_parser("errors")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--layers", nargs="+", type=int, default=[3, 15, 27])
    e.add_argument(
        "--modules", nargs="+", default=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]
    )
    e.add_argument("--samples", type=int, default=32)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    e.add_argument("--redo", action="store_true", help="drop the rows measured earlier")
    e.add_argument("--variants", nargs="+", help="only these rows (labels of VARIANTS)")
    s = sub.add_parser("speed")
    s.add_argument("--repeats", type=int, default=30)
    s.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("ppl")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    p.add_argument(
        "--methods",
        nargs="+",
        default=["svd-llm", "cur", "kronecker", "svd-sparse", "dense-sparse", "dictionary"],
    )
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--calib", default="shakespeare")
    p.add_argument("--pipeline", default="whole", choices=["whole", "sequential"])
    p.add_argument("--data", nargs="+", default=["shakespeare-heldout"])
    p.add_argument("--redo", action="store_true")
    sub.add_parser("report")
    args = parser.parse_args()
    {"errors": run_errors, "speed": run_speed, "ppl": run_ppl, "report": lambda a: None}[args.step](
        args
    )
    write_report()


if __name__ == "__main__":
    main()
