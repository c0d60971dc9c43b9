"""``rankcut inspect``: how low-rank are a model's matrices, before compressing it.

Per target matrix: singular values (raw and, with calibration, whitened by the
Cholesky factor of its input Gram, i.e. the spectrum of the output error that
SVD-LLM truncates), the share of spectral energy kept at the uniform rank of given
ratios, the RankMe effective rank, the top-half power-law exponent and the heavy-tail
allocator's low-rank / not-low-rank classification.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .decompose import whitened_spectrum
from .decompose.spectrum import (
    DEFAULT_BETA_MIN,
    decay_exponent,
    effective_rank,
    energy_kept,
)
from .layers import dense_shape, dense_weight
from .models import find_targets
from .rank import rank_for_ratio


def inspect_model(
    model: nn.Module,
    calibration: Tensor | None = None,
    ratios: tuple[float, ...] = (0.2, 0.4),
    beta_min: float = DEFAULT_BETA_MIN,
    eps: float = 1e-6,
    targets: list[str] | None = None,
    exclude: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Spectra and their summaries for every target matrix of ``model``.

    Returns:
        ``{"rows": [...], "spectra": {name: {"raw": Tensor, "whitened": Tensor | None}},
        "ratios", "beta_min", "whitened"}``. A row holds ``name``, ``shape``,
        ``effective_rank`` (raw), ``effective_rank_whitened``, ``beta`` and ``low_rank``
        (on the whitened spectrum when there is one), and ``energy``: ``{ratio:
        {"rank", "raw", "whitened"}}``.

    Example:
        >>> info = inspect_model(rankcut.load("smollm2-135m"))  # doctest: +SKIP
        >>> info["rows"][0]["effective_rank"]  # doctest: +SKIP
    """
    modules = find_targets(model, targets, exclude)
    stats = None
    if calibration is not None:
        from .calibrate.collect import collect_input_stats

        stats = collect_input_stats(model, modules, calibration, progress=progress)
    rows, spectra = [], {}
    for name, module in tqdm(modules.items(), desc="spectra", disable=not progress, leave=False):
        weight = dense_weight(module).detach().to(torch.float64)
        raw = torch.linalg.svdvals(weight)
        white = None
        if stats is not None:
            white = whitened_spectrum(weight, stats[name].cholesky(eps, name))
        main = white if white is not None else raw
        m, n = dense_shape(module)
        energy = {}
        for ratio in ratios:
            rank = rank_for_ratio(m, n, ratio)
            energy[str(ratio)] = {
                "rank": rank,
                "raw": energy_kept(raw, rank),
                "whitened": None if white is None else energy_kept(white, rank),
            }
        beta = decay_exponent(main)
        rows.append(
            {
                "name": name,
                "shape": [m, n],
                "effective_rank": effective_rank(raw),
                "effective_rank_whitened": None if white is None else effective_rank(white),
                "beta": beta,
                "low_rank": beta >= beta_min,
                "energy": energy,
            }
        )
        spectra[name] = {"raw": raw, "whitened": white}
    return {
        "rows": rows,
        "spectra": spectra,
        "ratios": list(ratios),
        "beta_min": beta_min,
        "whitened": stats is not None,
    }


def format_table(info: dict) -> str:
    """Markdown table of ``inspect_model``'s rows."""
    white = info["whitened"]
    head = ["matrix", "shape", "eff. rank"]
    if white:
        head.append("eff. rank (whitened)")
    head += ["beta", "low-rank"]
    for ratio in info["ratios"]:
        head.append(f"energy @ r({ratio})" + (" whitened" if white else ""))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in info["rows"]:
        cells = [row["name"], "x".join(map(str, row["shape"])), f"{row['effective_rank']:.1f}"]
        if white:
            cells.append(f"{row['effective_rank_whitened']:.1f}")
        cells += [f"{row['beta']:.3f}", "yes" if row["low_rank"] else "no"]
        for ratio in info["ratios"]:
            e = row["energy"][str(ratio)]
            value = e["whitened"] if white else e["raw"]
            cells.append(f"{e['rank']}: {value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_inspect(info: dict, out: str | Path, title: str = "") -> list[Path]:
    """``inspect.md``, ``inspect.json`` and PNG plots (spectra, effective rank) in ``out``."""
    from .plots import layer_heatmap, spectra_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "spectra_raw.png"]
    spectra_plot(
        {k: v["raw"] for k, v in info["spectra"].items()}, "raw singular values", written[0]
    )
    if info["whitened"]:
        written.append(out / "spectra_whitened.png")
        spectra_plot(
            {k: v["whitened"] for k, v in info["spectra"].items()},
            "whitened singular values (W S, S S^T = X^T X)",
            written[-1],
        )
    key = "effective_rank_whitened" if info["whitened"] else "effective_rank"
    written.append(out / "effective_rank.png")
    layer_heatmap(
        {r["name"]: r[key] / min(r["shape"]) for r in info["rows"]},
        "effective rank / full rank" + (" (whitened)" if info["whitened"] else ""),
        "fraction",
        written[-1],
    )
    low = sum(r["low_rank"] for r in info["rows"])
    images = "\n".join(f"![{p.stem}]({p.name})" for p in written)
    md = "\n".join(
        [
            f"# Inspect{': ' + title if title else ''}",
            "",
            f"{len(info['rows'])} matrices; {low} low-rank (top-half power-law exponent "
            f"beta >= {info['beta_min']}), {len(info['rows']) - low} not. Energy: share of "
            "sum(s_i^2) kept at the uniform rank r(c) = floor((1-c) mn/(m+n)) of ratio c. "
            "Effective rank: RankMe, exp of the entropy of s_i / sum(s).",
            "",
            "## Plots",
            "",
            images,
            "",
            "## Matrices",
            "",
            format_table(info),
            "",
        ]
    )
    (out / "inspect.md").write_text(md)
    rows = {k: v for k, v in info.items() if k != "spectra"}
    rows["spectra"] = {
        k: {kind: None if s is None else [float(x) for x in s] for kind, s in v.items()}
        for k, v in info["spectra"].items()
    }
    (out / "inspect.json").write_text(json.dumps(rows) + "\n")
    return [out / "inspect.md", out / "inspect.json", *written]
