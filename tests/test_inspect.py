"""Effective rank of known spectra; ``rankcut inspect`` on a tiny model writes its files."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from rankcut.cli import main
from rankcut.decompose import decay_exponent, effective_rank, energy_kept, is_low_rank


@pytest.mark.parametrize("n", [1, 5, 64])
def test_effective_rank_flat_is_full(n):
    assert effective_rank(torch.full((n,), 3.7)) == pytest.approx(n)


def test_effective_rank_one_hot_is_one():
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_effective_rank_two_equal_of_four():
    s = torch.tensor([2.0, 2.0, 0.0, 0.0])
    assert effective_rank(s) == pytest.approx(2.0)
    # known entropy: p = (0.5, 0.25, 0.25) -> H = 1.5 ln 2
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2**1.5)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_energy_kept_and_low_rank():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert energy_kept(s, 1) == pytest.approx(9 / 14)
    assert energy_kept(s, 0) == 1.0 and energy_kept(s, 3) == 1.0
    power = torch.arange(1, 101, dtype=torch.float64) ** -1.0
    assert decay_exponent(power) == pytest.approx(1.0)
    assert is_low_rank(power) and not is_low_rank(torch.ones(100))


def test_inspect_cli_writes_table_and_plots(tmp_path, tiny_llama_dir, calib_file, capsys):
    out = tmp_path / "inspect"
    args = ["inspect", str(tiny_llama_dir), "--calib", str(calib_file), "--samples", "2"]
    assert main(["-q", *args, "--seq-len", "32", "--ratios", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eff. rank (whitened)" in printed and "model.layers.1.mlp.down_proj" in printed
    md = (out / "inspect.md").read_text()
    for section in ("# Inspect", "## Plots", "## Matrices", "low-rank", "energy @ r(0.3)"):
        assert section in md
    for png in ("spectra_raw.png", "spectra_whitened.png", "effective_rank.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and f"({png})" in md
    info = json.loads((out / "inspect.json").read_text())
    assert len(info["rows"]) == 14 and info["whitened"]
    row = info["rows"][0]
    assert 1.0 <= row["effective_rank"] <= min(row["shape"])
    e = row["energy"]["0.3"]
    assert 0.0 < e["raw"] <= 1.0 and 0.0 < e["whitened"] <= 1.0
    assert len(info["spectra"][row["name"]]["raw"]) == min(row["shape"])
    assert not math.isnan(row["beta"])


def test_inspect_raw_only_without_calibration(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "raw"
    assert main(["-q", "inspect", str(tiny_llama_dir), "--out", str(out)]) == 0
    assert not (out / "spectra_whitened.png").exists()
    assert "eff. rank (whitened)" not in (out / "inspect.md").read_text()


def test_import_rankcut_does_not_import_matplotlib():
    import subprocess

    code = (
        "import rankcut, rankcut.analysis, rankcut.plots, sys; print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
