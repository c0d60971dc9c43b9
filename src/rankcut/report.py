"""``report.md`` and ``report.html`` for a rankcut output folder.

Both are built from ``rankcut.json`` alone (so any saved folder can get one): parameter
counts before/after, the ranks as a layer x module heat map, held-out perplexity
before/after when the compression was evaluated, and the time spent per phase. The
HTML page embeds its plot as a base64 PNG; the Markdown page links ``ranks.png``.

Example:
    >>> from rankcut.report import write_report
    >>> write_report("runs/smollm2-svdllm")  # doctest: +SKIP
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

REPORT_FILES = ("report.md", "report.html", "ranks.png")


def _kept_fraction(meta: dict) -> dict[str, float]:
    """Parameter fraction kept per targeted matrix: ``r (m + n) / (m n)``, dense = 1."""
    out = {}
    for name, spec in meta.get("layers", {}).items():
        m, n, r = spec["out_features"], spec["in_features"], spec["rank"]
        out[name] = r * (m + n) / (m * n)
    for name in meta.get("kept_dense") or []:
        out.setdefault(name, 1.0)
    return out


def _sections(meta: dict) -> list[tuple[str, list[list[str]] | str]]:
    """``(title, table rows or text)`` in report order."""
    sections: list[tuple[str, list[list[str]] | str]] = []
    cfg = meta.get("method_config") or {}
    calib = meta.get("calibration") or {}
    summary = [["setting", "value"], ["source model", str(meta.get("source_model", "?"))]]
    summary += [[k, json.dumps(v)] for k, v in cfg.items() if k not in ("version",)]
    if calib:
        summary.append(
            [
                "calibration",
                f"{calib.get('data')}: {calib.get('samples')} x {calib.get('seq_len')} tokens",
            ]
        )
    sections.append(("Method", summary))
    p = meta.get("params") or {}
    if p:
        rows = [["", "before", "after", "removed"]]
        for label, key in (("targeted matrices", "targeted"), ("whole model", "model")):
            before, after = p.get(f"{key}_before"), p.get(f"{key}_after")
            if before:
                rows.append([label, f"{before:,}", f"{after:,}", f"{1 - after / before:.1%}"])
        sections.append(("Parameters", rows))
    ppl = meta.get("perplexity")
    if ppl:
        rows = [["", "perplexity"]]
        rows += [[k, f"{ppl[k]:.3f}"] for k in ("dense", "compressed") if k in ppl]
        sections.append((f"Perplexity ({ppl.get('data', 'held-out text')})", rows))
    layers = meta.get("layers", {})
    if layers:
        ranks = sorted(spec["rank"] for spec in layers.values())
        kept = len(meta.get("kept_dense") or [])
        text = (
            f"{len(layers)} matrices factorized (rank {ranks[0]} to {ranks[-1]}, median "
            f"{ranks[len(ranks) // 2]}), {kept} kept dense. Colour: parameters kept, "
            "r (m + n) / (m n) (1 = dense); numbers: ranks (D = dense)."
        )
        sections.append(("Ranks per layer", text))
    # rankcut.json sorts its keys: put the phases back in the order they run.
    phases = dict(sorted((meta.get("phases") or {}).items(), key=lambda kv: _phase_rank(kv[0])))
    if meta.get("recovery", {}).get("seconds") is not None:
        phases["recovery fine-tuning"] = meta["recovery"]["seconds"]
    if phases:
        rows = [["phase", "seconds"]] + [[k, f"{v:.1f}"] for k, v in phases.items()]
        sections.append(("Time per phase", rows))
    rec = meta.get("recovery")
    if rec:
        rows = [["", "value"]] + [
            [k, f"{v:.4g}" if isinstance(v, float) else str(v)]
            for k, v in rec.items()
            if not isinstance(v, dict)
        ]
        sections.append(("Recovery fine-tuning", rows))
    return sections


PHASE_ORDER = (
    "loading",
    "evaluation (dense)",
    "statistics",
    "allocation",
    "factorization",
    "evaluation (compressed)",
)


def _phase_rank(name: str) -> int:
    return PHASE_ORDER.index(name) if name in PHASE_ORDER else len(PHASE_ORDER)


def _md_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    head, *body = rows
    th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{trs}</table>"


def render(meta: dict, title: str = "rankcut compression report") -> dict[str, str | bytes]:
    """``{"report.md": text, "report.html": text, "ranks.png": bytes}`` from ``rankcut.json``."""
    from .plots import data_uri, layer_heatmap

    files: dict[str, str | bytes] = {}
    fractions = _kept_fraction(meta)
    png = None
    if fractions:
        labels = {n: str(s["rank"]) for n, s in meta.get("layers", {}).items()}
        labels.update({n: "D" for n in meta.get("kept_dense") or []})
        try:
            png = layer_heatmap(fractions, "ranks per layer", "parameters kept", None, labels)
            files["ranks.png"] = png
        except ImportError as err:  # matplotlib is optional: the tables still get written
            logger.warning("report without plots (%s)", err)
    md, body = [f"# {title}", ""], [f"<h1>{html.escape(title)}</h1>"]
    for heading, content in _sections(meta):
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, str):
            md += [content, ""]
            body.append(f"<p>{html.escape(content)}</p>")
        else:
            md += [_md_table(content), ""]
            body.append(_html_table(content))
        if heading == "Ranks per layer" and png is not None:
            md += ["![ranks per layer](ranks.png)", ""]
            body.append(f'<img alt="ranks per layer" src="{data_uri(png)}">')
    files["report.md"] = "\n".join(md)
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    )
    files["report.html"] = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return files


def write_report(folder: str | Path, name: str | None = None) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``ranks.png`` into a rankcut output folder.

    ``folder`` may be the temporary folder of an output still being written (so the
    report is renamed into place with the rest); ``name`` is then the output's final
    name, which the report's title shows (default: ``folder``'s own name).

    Returns:
        The files written.

    Example:
        >>> with rankcut.io.atomic_dir("runs/out") as tmp:  # doctest: +SKIP
        ...     rankcut.save(model, tmp)
        ...     write_report(tmp, name="out")
    """
    from .io import read_meta

    folder = Path(folder)
    meta = read_meta(folder)
    written = []
    title = f"rankcut report: {name or folder.name}"
    for file_name, content in render(meta, title).items():
        path = folder / file_name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        written.append(path)
    return written
