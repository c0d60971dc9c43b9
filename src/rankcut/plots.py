"""PNG plots for ``inspect`` and compression reports (matplotlib, imported when used)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

_LAYER = re.compile(r"\.(\d+)\.")


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")`` (no index: ``None``).

    Example:
        >>> layer_and_kind("model.layers.3.self_attn.q_proj")
        (3, 'self_attn.q_proj')
    """
    match = _LAYER.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end() :]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path | None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def spectra_plot(spectra: dict, title: str, path: str | Path | None = None) -> bytes:
    """Normalized singular values ``s_i / s_0`` (log scale), one panel per module kind,
    one line per layer coloured by depth. Returns the PNG bytes (also written to ``path``)."""
    plt = _pyplot()
    kinds: dict[str, list[tuple[int, object]]] = {}
    for name, s in spectra.items():
        layer, kind = layer_and_kind(name)
        kinds.setdefault(kind, []).append((layer or 0, s))
    cols = min(4, len(kinds)) or 1
    rows = (len(kinds) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (kind, items) in zip(axes.flat, sorted(kinds.items()), strict=False):
        depth = max(layer for layer, _ in items) or 1
        for layer, s in sorted(items, key=lambda t: t[0]):
            values = [float(v) for v in s]
            top = values[0] if values and values[0] > 0 else 1.0
            ax.semilogy([v / top for v in values], color=cmap(layer / depth), lw=0.8)
        ax.set_title(kind, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.subplots_adjust(hspace=0.45, wspace=0.3)
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("index i (colour: layer depth)", fontsize=8)
    fig.supylabel("s_i / s_0", fontsize=8)
    return _save(fig, path)


def layer_heatmap(
    values: dict[str, float],
    title: str,
    label: str,
    path: str | Path | None = None,
    annotations: dict[str, str] | None = None,
) -> bytes:
    """A layer x module heat map of ``values`` keyed by module name; returns PNG bytes."""
    plt = _pyplot()
    import numpy as np

    cells = {layer_and_kind(n): v for n, v in values.items()}
    layers = sorted({layer for layer, _ in cells if layer is not None}) or [0]
    kinds = sorted({kind for _, kind in cells})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), v in cells.items():
        grid[layers.index(layer if layer is not None else layers[0]), kinds.index(kind)] = v
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(kinds), 1.2 + 0.22 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, fontsize=7)
    ax.set_yticks(range(len(layers)), [str(v) for v in layers], fontsize=6)
    ax.set_ylabel("layer", fontsize=8)
    ax.set_title(title, fontsize=9)
    if annotations:
        for name, text in annotations.items():
            layer, kind = layer_and_kind(name)
            row = layers.index(layer if layer is not None else layers[0])
            value = values.get(name, np.nan)
            bright = np.isfinite(value) and value > np.nanmin(grid) + 0.6 * np.ptp(
                grid[np.isfinite(grid)]
            )
            ax.text(
                kinds.index(kind),
                row,
                text,
                ha="center",
                va="center",
                fontsize=5,
                color="k" if bright else "w",
            )
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, path)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
