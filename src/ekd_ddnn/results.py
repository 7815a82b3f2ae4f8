"""The per-depth results table: one row per depth with size, cost and errors.

Written as ``results.json`` (a list of objects, full-net first) and ``results.md`` in a run
directory; DESIGN section 5 fixes the keys users script against.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ekd_ddnn.models import DepthDynamicNet, count_macs, count_params


def depth_rows(net: DepthDynamicNet, depths: Sequence[Sequence[int]] | None = None) -> list[dict]:
    """Name, blocks, standalone params and MACs (one image at the net's input size) per depth."""
    shape = (net.config["in_channels"], net.config["image_size"], net.config["image_size"])
    rows = []
    for depth in net.depths if depths is None else depths:
        standalone = net.extract(depth)
        rows.append(
            {
                "name": net.name_of(depth),
                "blocks": list(depth),
                "params": count_params(standalone),
                "macs": count_macs(standalone, shape),
            }
        )
    return rows


def add_errors(rows: list[dict], metrics: Mapping[str, float], split: str) -> list[dict]:
    """Fill ``top1_err`` / ``top5_err`` (percent) from logged ``<split>/top*_err/<name>``."""
    for row in rows:
        for key in ("top1_err", "top5_err"):
            value = metrics.get(f"{split}/{key}/{row['name']}")
            row[key] = None if value is None else round(float(value), 4)
        row["split"] = split
    return rows


def format_params(n: int) -> str:
    """``25.6M``; two decimals below one million (``0.27M``)."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e6:.2f}M"


def format_macs(n: int, unit: str = "G") -> str:
    """``4.09G`` (unit ``G``) or ``40.6M`` (unit ``M``)."""
    return f"{n / 1e9:.2f}G" if unit == "G" else f"{n / 1e6:.1f}M"


COLUMNS = {  # key -> (header, formatter)
    "name": ("net", str),
    "blocks": ("blocks", lambda b: "[" + ",".join(map(str, b)) + "]"),
    "params": ("params", format_params),
    "macs": ("MACs", format_macs),
    "top1_err": ("top-1 err %", lambda v: "-" if v is None else f"{v:.2f}"),
    "top5_err": ("top-5 err %", lambda v: "-" if v is None else f"{v:.2f}"),
    "latency_ms": ("latency ms", lambda v: f"{v:.2f}"),
    "throughput": ("img/s", lambda v: f"{v:.0f}"),
}


def format_table(rows: Sequence[Mapping]) -> str:
    """A Markdown table of the columns present in ``rows``."""
    keys = [k for k in COLUMNS if rows and k in rows[0]]
    # one MACs unit per table: G where the largest net reaches 1 GMAC, else M
    unit = "G" if rows and "macs" in rows[0] and max(r["macs"] for r in rows) >= 1e9 else "M"
    formatters = {**{k: f for k, (_, f) in COLUMNS.items()}, "macs": lambda n: format_macs(n, unit)}
    lines = [
        "| " + " | ".join(COLUMNS[k][0] for k in keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    lines += ["| " + " | ".join(formatters[k](row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def write_results(rows: Sequence[Mapping], out_dir: str | Path, title: str = "") -> Path:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(list(rows), indent=2) + "\n")
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    split = rows[0].get("split") if rows else None
    header = f"# {title}\n\n" if title else ""
    note = f"\nErrors on the {split} split.\n" if split else ""
    (out_dir / "results.md").write_text(header + format_table(rows) + "\n" + note)
    return path


def _csv_value(value: object) -> object:
    return "-".join(map(str, value)) if isinstance(value, list) else value


def plot_accuracy_vs_macs(rows: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Top-1 accuracy against MACs, one labelled point per depth (the paper's trade-off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    macs = [row["macs"] / 1e6 for row in rows]
    acc = [100.0 - row["top1_err"] for row in rows]
    ax.plot(macs, acc, "o")
    for row, x, y in zip(rows, macs, acc, strict=True):
        ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel(f"top-1 accuracy on {rows[0].get('split', '')} (%)")
    ax.set_title(title or "accuracy vs MACs per depth", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)  # room for the labels
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
