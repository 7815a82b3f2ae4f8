"""``python -m ekd_ddnn.aggregate <multirun dir>``: one table for a sweep.

Reads every job's overrides (``read_overrides``: those of its latest command) and
``results.json``; writes ``aggregate.json``, ``aggregate.csv``, ``aggregate.md`` and, where
exactly two values were swept, ``aggregate_heatmap.png`` into the multirun directory.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import UserError
from ekd_ddnn.results import read_overrides, read_results, write_table
from ekd_ddnn.run.cli import report_user_errors, run_app


def _overrides(job: Path) -> dict[str, str]:
    """The job's ``key=value`` overrides as a dict."""
    return dict(item.split("=", 1) for item in read_overrides(job) if "=" in item)


def collect(multirun_dir: str | Path) -> tuple[list[str], list[dict]]:
    """The swept keys and one row per finished job (swept values, errors per depth)."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise UserError(
            f"{root} is not a directory; pass a multirun dir (logs/train/multiruns/...)"
        )
    jobs = sorted((p.parent for p in root.glob("*/results.json")), key=lambda p: p.name)
    if not jobs:
        raise UserError(
            f"{root} holds no finished jobs (no */results.json); pass a multirun directory "
            "such as logs/train/multiruns/<timestamp>"
        )
    overrides = {job: _overrides(job) for job in jobs}
    keys = sorted({k for o in overrides.values() for k in o})
    swept = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    rows = []
    for job in jobs:
        results = read_results(job / "results.json")
        row = {"job": job.name, **{k: overrides[job].get(k) for k in swept}}
        errors = {r["name"]: r["top1_err"] for r in results}
        row.update({f"top1_err/{name}": err for name, err in errors.items()})
        sub = [e for e in list(errors.values())[1:] if e is not None]
        row["top1_err/subnets_mean"] = round(statistics.mean(sub), 4) if sub else None
        row["split"] = results[0].get("split")
        rows.append(row)
    return swept, rows


def _number(value: str | None) -> float | str | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value


def plot_heatmap(swept: list[str], rows: list[dict], metric: str, path: Path) -> Path | None:
    """A heatmap of ``top1_err/<metric>`` over the two swept keys; None unless two."""
    if len(swept) != 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_key, x_key = swept
    xs = sorted({r[x_key] for r in rows}, key=_number)
    ys = sorted({r[y_key] for r in rows}, key=_number)
    grid = [[float("nan")] * len(xs) for _ in ys]
    for r in rows:
        value = r.get(f"top1_err/{metric}")
        grid[ys.index(r[y_key])][xs.index(r[x_key])] = float("nan") if value is None else value
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2, 0.8 * len(ys) + 1.5), dpi=120)
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label=f"top-1 error % ({metric})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_aggregate(root: Path, swept: list[str], rows: list[dict], metric: str) -> list[Path]:
    """Write the table (json, csv, md) and the heatmap into ``root``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    written = write_table(root, "aggregate", rows, "\n".join(lines) + "\n")
    heatmap = plot_heatmap(swept, rows, metric, root / "aggregate_heatmap.png")
    return written + ([heatmap] if heatmap else [])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="aggregate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point: prints the table and the files written."""
    if OmegaConf.is_missing(cfg, "dir"):
        raise UserError("pass the multirun directory: python -m ekd_ddnn.aggregate <dir>")
    root = Path(cfg.dir)
    swept, rows = collect(root)
    written = write_aggregate(root, swept, rows, cfg.heatmap_metric)
    print((root / "aggregate.md").read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written))


def cli() -> None:
    """``ekd-aggregate`` / ``python -m ekd_ddnn.aggregate``; a bare path is the directory:
    ``ekd-aggregate logs/train/multiruns/...``."""
    sys.argv[1:] = [a if "=" in a or a.startswith("-") else f"dir={a}" for a in sys.argv[1:]]
    run_app(main, "aggregate")


if __name__ == "__main__":
    cli()
