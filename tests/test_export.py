"""``rankcut export --merge``: a plain dense checkpoint with the factorized model's logits."""

from __future__ import annotations

import json

import torch

import rankcut
from rankcut.cli import main
from rankcut.layers import factorized_modules


def test_export_merge_logits_equal(tmp_path, tiny_llama_dir, windows):
    from transformers import AutoModelForCausalLM

    comp = tmp_path / "comp"
    args = ["compress", "--model", str(tiny_llama_dir), "--method", "svd", "--ratio", "0.4"]
    assert main(["-q", *args, "--allocation", "uniform", "--out", str(comp)]) == 0
    factorized = rankcut.load(comp)
    assert factorized_modules(factorized)
    merged_dir = tmp_path / "merged"
    assert main(["-q", "export", str(comp), "--merge", "--out", str(merged_dir)]) == 0
    assert not (merged_dir / "rankcut.json").exists()
    assert (merged_dir / "tokenizer.json").exists()
    assert "rankcut" not in json.dumps(json.loads((merged_dir / "config.json").read_text()))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not factorized_modules(merged)
    with torch.no_grad():
        a = factorized(input_ids=windows).logits
        b = merged(input_ids=windows).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # the dense checkpoint is no smaller: the merge restores m x n per matrix
    dense_count = sum(p.numel() for p in merged.parameters())
    assert dense_count == rankcut.evaluate.param_summary(factorized)["params_dense_equivalent"]


def test_export_needs_merge_and_refuses_non_empty_out(tmp_path, tiny_llama_dir, capsys):
    assert main(["-q", "export", str(tiny_llama_dir), "--out", str(tmp_path / "x")]) == 2
    assert "--merge" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    assert main(["-q", "export", str(tiny_llama_dir), "--merge", "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_export_overwrite(tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    assert main(["-q", "export", str(tiny_llama_dir), "--merge", "--out", str(out)]) == 0
    assert (
        main(["-q", "export", str(tiny_llama_dir), "--merge", "--out", str(out), "--overwrite"])
        == 0
    )
    assert (out / "config.json").exists()
