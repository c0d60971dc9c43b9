"""Every ``compress`` writes ``report.md`` / ``report.html`` with the expected sections."""

from __future__ import annotations

import base64
import json
import re

from rankcut.cli import main
from rankcut.report import render


def test_compress_writes_report(tmp_path, tiny_llama_dir, calib_file, eval_file, capsys):
    out = tmp_path / "c"
    args = ["compress", "--model", str(tiny_llama_dir), "--method", "svd-llm", "--ratio", "0.3"]
    args += ["--calib", str(calib_file), "--samples", "2", "--seq-len", "32"]
    args += ["--eval-data", str(eval_file), "--allocation", "uniform", "--out", str(out)]
    assert main(["-q", *args]) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed
    md = (out / "report.md").read_text()
    for section in (
        "## Method",
        "## Parameters",
        "## Perplexity",
        "## Ranks per layer",
        "## Time per phase",
        "![ranks per layer](ranks.png)",
        "| dense |",
        "| compressed |",
        "| whole model |",
        "| factorization |",
    ):
        assert section in md, section
    meta = json.loads((out / "rankcut.json").read_text())
    assert meta["params"]["model_before"] > meta["params"]["model_after"]
    assert f"{meta['params']['model_before']:,}" in md
    assert meta["perplexity"]["dense"] > 0 and meta["perplexity"]["compressed"] > 0
    assert (out / "ranks.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text()
    assert "<h2>Ranks per layer</h2>" in page and "<h2>Perplexity" in page
    uri = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert uri and base64.b64decode(uri.group(1)).startswith(b"\x89PNG")


def test_report_without_evaluation_or_layers():
    files = render({"params": {"model_before": 10, "model_after": 8}, "layers": {}})
    assert "## Parameters" in files["report.md"]
    assert "## Perplexity" not in files["report.md"] and "ranks.png" not in files


def test_kept_dense_shown_in_heatmap_labels():
    meta = {
        "layers": {"m.layers.0.q": {"out_features": 8, "in_features": 8, "rank": 2}},
        "kept_dense": ["m.layers.0.k"],
    }
    files = render(meta)
    assert "1 matrices factorized" in files["report.md"] and "1 kept dense" in files["report.md"]
    assert files["ranks.png"].startswith(b"\x89PNG")
