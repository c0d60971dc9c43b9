"""Streaming compression of a ~1.3B-parameter Llama checkpoint: peak memory and time per layer.

Usage:
    nice -n 10 .venv/bin/python benchmarks/scale.py [--layers 22] [--samples 8] [--seq-len 256]
        [--nproc 1] [--keep DIR]

Builds a random-initialized Llama-architecture checkpoint (hidden 2048, MLP 5504, 16
heads, SmolLM2's 49152-token vocabulary, untied head; fp32 safetensors, one shard per
layer) in a temporary folder, one layer at a time (the whole model is never in
memory), then runs ``rankcut compress --pipeline sequential`` on it as a subprocess
(svd-llm, ratio 0.2, uniform allocation, refit on) and samples the resident memory of
the subprocess tree with psutil every 50 ms. Calibration is deliberately small (8 x 256
tokens of Shakespeare) to keep CPU time sane; activations scale with it, weights do not.
Writes benchmarks/results/scale.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

RESULTS = Path(__file__).parent / "results"


def build_checkpoint(folder: Path, layers: int, hidden: int, inter: int, heads: int) -> dict:
    """Write config, tokenizer and one safetensors shard per layer; returns sizes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from rankcut.models.sources import hf_location

    _, smol = hf_location("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smol) / name, folder / name)
    vocab = 49152
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    std = 0.02
    n_shards = layers + 2
    weight_map, total, params = {}, 0, 0

    def shard(i: int, tensors: dict) -> None:
        nonlocal total, params
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        params += sum(t.numel() for t in tensors.values())

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * std

    shard(0, {"model.embed_tokens.weight": randn(vocab, hidden)})
    for k in range(layers):
        p = f"model.layers.{k}."
        shard(
            k + 1,
            {
                p + "self_attn.q_proj.weight": randn(hidden, hidden),
                p + "self_attn.k_proj.weight": randn(hidden, hidden),
                p + "self_attn.v_proj.weight": randn(hidden, hidden),
                p + "self_attn.o_proj.weight": randn(hidden, hidden),
                p + "mlp.gate_proj.weight": randn(inter, hidden),
                p + "mlp.up_proj.weight": randn(inter, hidden),
                p + "mlp.down_proj.weight": randn(hidden, inter),
                p + "input_layernorm.weight": torch.ones(hidden),
                p + "post_attention_layernorm.weight": torch.ones(hidden),
            },
        )
    shard(
        layers + 1,
        {"model.norm.weight": torch.ones(hidden), "lm_head.weight": randn(vocab, hidden)},
    )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"params": params, "tensor_bytes": total, "disk_bytes": disk}


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; peak summed RSS of the process and its children (psutil, 50 ms)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    return {"returncode": proc.returncode, "peak_rss": peak, "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument(
        "--compress-layers",
        type=int,
        help="factorize only the first N layers (the others still stream through: "
        "loaded, run, written); default all",
    )
    parser.add_argument("--keep", help="build (or reuse) the checkpoint here instead of a temp dir")
    parser.add_argument("--name", default="scale", help="results file stem (scale)")
    parser.add_argument(
        "--compare",
        metavar="NAME",
        help="results stem of an earlier run of the same job (e.g. the 1-process 'scale'): "
        "its wall time is reported beside this one, with the ratio",
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rankcut-scale-"))
    ckpt = Path(args.keep) if args.keep else tmp / "ckpt"
    try:
        t0 = time.perf_counter()
        if not (ckpt / "model.safetensors.index.json").is_file():
            ckpt.mkdir(parents=True, exist_ok=True)
            sizes = build_checkpoint(ckpt, args.layers, args.hidden, args.intermediate, args.heads)
            build_s = time.perf_counter() - t0
        else:
            from safetensors import safe_open

            index = json.loads((ckpt / "model.safetensors.index.json").read_text())
            disk, params = 0, 0
            for f in ckpt.glob("*.safetensors"):
                disk += f.stat().st_size
                with safe_open(str(f), framework="pt") as st:
                    params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
            sizes = {
                "params": params,
                "tensor_bytes": index["metadata"]["total_size"],
                "disk_bytes": disk,
            }
            build_s = 0.0
        print(
            f"checkpoint: {sizes['disk_bytes'] / 2**30:.2f} GiB on disk, built in {build_s:.0f} s"
        )
        out = tmp / "out"
        cmd = [
            sys.executable,
            "-m",
            "rankcut",
            "-q",
            "compress",
            "--model",
            str(ckpt),
            "--pipeline",
            "sequential",
            "--method",
            "svd-llm",
            "--ratio",
            "0.2",
            "--allocation",
            "uniform",
            "--calib",
            "shakespeare",
            "--samples",
            str(args.samples),
            "--seq-len",
            str(args.seq_len),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
        if args.compress_layers is not None:
            first = "|".join(str(k) for k in range(args.compress_layers))
            cmd += ["--targets", rf"model\.layers\.({first})\."]
        if args.nproc > 1:
            cmd += ["--nproc", str(args.nproc)]
        env = dict(os.environ)
        run = run_measured(cmd, env)
        if run["returncode"] != 0:
            raise SystemExit(f"compress failed with exit code {run['returncode']}")
        meta = json.loads((out / "rankcut.json").read_text())
        layer_s = meta["streaming"]["layer_seconds"]
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        result = {
            "command": "nice -n 10 .venv/bin/python benchmarks/scale.py " + " ".join(sys.argv[1:]),
            "compress_command": " ".join(cmd[1:]).replace(str(tmp), "$TMP"),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "nproc": args.nproc,
            "layers": args.layers,
            "params": sizes["params"],
            "checkpoint_bytes": sizes["disk_bytes"],
            "peak_rss_bytes": run["peak_rss"],
            "peak_rss_fraction": run["peak_rss"] / sizes["disk_bytes"],
            "wall_s": round(run["wall_s"], 1),
            "layer_seconds": layer_s,
            "compress_layers": args.compress_layers,
            "mean_layer_s": round(sum(layer_s) / len(layer_s), 2),
            "output_bytes": out_bytes,
            "params_after": meta["params"]["model_after"],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gib = 2**30
    rows = [
        ("parameters", f"{result['params']:,}" if result["params"] else "n/a"),
        ("checkpoint (fp32 safetensors)", f"{result['checkpoint_bytes'] / gib:.2f} GiB"),
        ("peak RSS (process tree)", f"{result['peak_rss_bytes'] / gib:.2f} GiB"),
        ("peak RSS / checkpoint", f"{result['peak_rss_fraction']:.1%} (target < 30%)"),
        ("processes", str(args.nproc)),
        ("wall time (whole command)", f"{result['wall_s']:.0f} s"),
        ("mean time per layer", f"{result['mean_layer_s']:.1f} s"),
        ("compressed output", f"{result['output_bytes'] / gib:.2f} GiB"),
    ]
    if args.compare:
        other = json.loads((RESULTS / f"{args.compare}.json").read_text())
        result["compare"] = {
            "name": args.compare,
            "nproc": other["nproc"],
            "wall_s": other["wall_s"],
        }
        rows += [
            (
                f"wall time of `{args.compare}` ({other['nproc']} process(es))",
                f"{other['wall_s']:.0f} s",
            ),
            ("wall-time ratio (this / that)", f"{result['wall_s'] / other['wall_s']:.2f}"),
        ]
    table = "| quantity | value |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    compressed = (
        "all layers factorized"
        if args.compress_layers is None
        else f"only layers 0-{args.compress_layers - 1} factorized; the other layers are "
        "streamed through unchanged: loaded, run on the activations, written"
    )
    per_layer = ", ".join(f"{s:.1f}" for s in layer_s)
    md = (
        f"# Streaming compression at ~1.3B parameters ({args.name})\n\n"
        f"Command: `{result['command']}`\n\n"
        f"Compress command run (and measured): `rankcut {result['compress_command']}`\n\n"
        f"Random-initialized Llama-architecture checkpoint (hidden {args.hidden}, MLP "
        f"{args.intermediate}, {args.layers} layers, untied head, fp32), svd-llm ratio 0.2 "
        f"with refit ({compressed}), uniform "
        f"allocation, calibration {args.samples} x {args.seq_len} tokens of Shakespeare "
        "(small on purpose: CPU time). Peak RSS is the sum over the compress process and its "
        f"children, sampled with psutil every 50 ms. Machine: {os.cpu_count()} CPU cores "
        "shared with other jobs; timings are indicative only.\n\n"
        f"{table}\n\nSeconds per layer: {per_layer}\n"
    )
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(md)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
