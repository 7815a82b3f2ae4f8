"""The per-depth results table: one row per depth with size, cost and errors.

Written as ``results.json`` (a list of objects, full-net first) and ``results.md`` in a run
directory; DESIGN section 5 fixes the keys users script against. :func:`read_results` and
:func:`read_overrides` read a finished run back (aggregate, study) with one-line errors.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ekd_ddnn.errors import UserError
from ekd_ddnn.run.records import latest_record

if TYPE_CHECKING:  # the models (torch) load on use: aggregate and study only read files
    from ekd_ddnn.models import DepthDynamicNet


def depth_rows(
    net: DepthDynamicNet,
    depths: Sequence[Sequence[int]] | None = None,
    *,
    image_size: int | None = None,
) -> list[dict]:
    """Name, blocks, standalone params and MACs per depth: MACs of one image at
    ``image_size`` (default: the size the net was built for)."""
    from ekd_ddnn.models import count_macs, count_params

    size = image_size or net.config["image_size"]
    shape = (net.config["in_channels"], size, size)
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
    "trained": ("trained", lambda v: "yes" if v else ""),
    "bn_images": ("BN images", lambda v: str(v) if v else "-"),
    "pareto": ("front", lambda v: "*" if v else ""),
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


def write_table(
    out_dir: str | Path,
    stem: str,
    rows: Sequence[Mapping],
    markdown: str,
    *,
    document: object = None,
) -> list[Path]:
    """Write ``<stem>.json`` (``document``, default the rows), ``<stem>.csv`` (one line per
    row; lists as ``3-3-3``) and ``<stem>.md`` into ``out_dir``, each atomically.

    The one writer of our tables: results, study and aggregate.
    """
    from ekd_ddnn.run.files import write_text_atomically

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["name"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md")]
    payload = list(rows) if document is None else document
    for path, text in zip(
        paths, (json.dumps(payload, indent=2) + "\n", buffer.getvalue(), markdown), strict=True
    ):
        write_text_atomically(path, text)
    return paths


def write_results(rows: Sequence[Mapping], out_dir: str | Path, title: str = "") -> Path:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``out_dir``."""
    split = rows[0].get("split") if rows else None
    header = f"# {title}\n\n" if title else ""
    note = f"\nErrors on the {split} split.\n" if split else ""
    return write_table(out_dir, "results", rows, header + format_table(rows) + "\n" + note)[0]


def _csv_value(value: object) -> object:
    return "-".join(map(str, value)) if isinstance(value, list) else value


def _kind(value: object) -> str:
    """``an object``, ``a list``, ... : what a JSON/YAML value is, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return next((k for t, k in kinds.items() if isinstance(value, t)), type(value).__name__)


def _shown(value: object, limit: int = 40) -> str:
    """``value`` as JSON on one line, cut to ``limit`` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number_or_null(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


# the keys aggregate and study read (DESIGN section 5), and what each must hold
RESULT_KEYS = {
    "name": ("a string", lambda v: isinstance(v, str)),
    "blocks": ("a list of integers", lambda v: isinstance(v, list) and all(map(_is_int, v))),
    "top1_err": ("a number or null", _is_number_or_null),
    "split": ("a string", lambda v: isinstance(v, str)),
}


def _results_problem(rows: object) -> str | None:
    """Why ``rows`` is not a results table (one line), or None where it is one."""
    if not isinstance(rows, list):
        return f"{_kind(rows)}, not a list of rows"
    if not rows:
        return "an empty list, no rows"
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            return f"row {i} is {_kind(row)}, not an object"
        for key, (wanted, ok) in RESULT_KEYS.items():
            if key not in row:
                return f"row {i} has no {key!r}"
            if not ok(row[key]):
                return f"row {i}: {key!r} must be {wanted}, got {_shown(row[key])}"
    return None


def read_results(path: str | Path) -> list[dict]:
    """The rows of a run's ``results.json``, checked: a JSON list of objects with ``name``
    (str), ``blocks`` (list of int), ``top1_err`` (number or null) and ``split`` (str).

    Anything else (unreadable, truncated, not JSON, another shape) raises :class:`UserError`
    naming the run (job) folder.
    """
    path = Path(path)
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        problem: str | None = f"cannot read it: {exc.strerror or type(exc).__name__}"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        problem = _results_problem(rows)
    if problem is not None:
        raise UserError(
            f"job {path.parent}: {path.name} is not a finished results table ({problem}); "
            "rerun that job or move its folder away"
        )
    return rows


def _yaml_problem(exc: Exception) -> str:
    """One line for a YAML error: the problem and where (``expected ... at line 2, column 1``)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_overrides(run_dir: str | Path) -> list[str]:
    """The command-line overrides Hydra recorded for the run in ``run_dir``: those of its
    latest command (``.hydra/resume-<n>/overrides.yaml`` once resumed, else
    ``.hydra/overrides.yaml``), so that a resumed run resumed again keeps what the last
    resumption changed, less its ``resume=`` (which command ran, not a setting of the run);
    ``[]`` where there is no record. A malformed file raises :class:`UserError` naming it."""
    run_dir = Path(run_dir)
    path = latest_record(run_dir) / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        items = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        problem: str | None = f"cannot read it: {exc.strerror or type(exc).__name__}"
    except (yaml.YAMLError, ValueError) as exc:
        problem = _yaml_problem(exc)
    else:
        items = [] if items is None else items
        if not isinstance(items, list):
            problem = f"{_kind(items)}, not a list of key=value strings"
        else:
            bad = [(i, item) for i, item in enumerate(items, 1) if not isinstance(item, str)]
            problem = f"item {bad[0][0]} is {_kind(bad[0][1])}, not a string" if bad else None
    if problem is not None:
        raise UserError(
            f"job {run_dir}: {path.relative_to(run_dir)} is not a list of overrides ({problem}); "
            "rerun that job or move its folder away"
        )
    return [item for item in items if item.lstrip("+").partition("=")[0] != "resume"]


def is_finite_number(value: object) -> bool:
    """An int or a float (not a bool) whose float value is finite: what a budget, a MACs
    count or an error percentage may be."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int past float's range
        return False


def read_reference(path: str | Path) -> list[dict]:
    """Reference points for the front plot from a YAML file of the user's: a list of
    ``{name: ..., macs: <count>, top1_err: <percent>}`` (e.g. individually trained nets).
    Read as data (``yaml.safe_load``), never instantiated."""
    path = Path(path)
    try:
        items = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8 text
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"cannot read reference={path}: {reason}") from None
    problem = None if isinstance(items, list) else f"it holds {_kind(items)}"
    for n, item in enumerate(items if problem is None else [], 1):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problem = f"item {n} has no name"
            break
        bad = next((k for k in ("macs", "top1_err") if not is_finite_number(item.get(k))), None)
        if bad is not None:
            value = item.get(bad)
            hint = " (YAML reads 1e6 as text: write 1.0e+6)" if isinstance(value, str) else ""
            problem = f"item {n} has {bad}: {value!r}{hint}"
            break
    if problem is not None:
        raise UserError(
            f"reference={path} must be a YAML list of {{name: <str>, macs: <number>, "
            f"top1_err: <number>}} with finite numbers; {problem}"
        )
    return items


def plot_front(
    rows: Sequence[Mapping],
    path: str | Path,
    title: str = "",
    reference: Sequence[Mapping] | None = None,
) -> Path:
    """Top-1 error against MACs: every depth a point, the accuracy-cost front (rows with
    ``pareto``) drawn as a line, the trained depths labelled, and ``reference`` points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rated = [r for r in rows if r.get("top1_err") is not None]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.plot([r["macs"] / 1e6 for r in rated], [r["top1_err"] for r in rated], "o",
            color="0.6", ms=4, label="depths")  # fmt: skip
    front = sorted((r for r in rated if r.get("pareto")), key=lambda r: r["macs"])
    if front:
        ax.step([r["macs"] / 1e6 for r in front], [r["top1_err"] for r in front], "-o",
                where="post", color="C0", ms=5, label="front")  # fmt: skip
    for r in rated:
        if r.get("trained", True):
            ax.annotate(r["name"], (r["macs"] / 1e6, r["top1_err"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)  # fmt: skip
    for i, ref in enumerate(reference or []):
        ax.plot(ref["macs"] / 1e6, ref["top1_err"], "s", color="C3",
                label="reference" if i == 0 else None)  # fmt: skip
        ax.annotate(ref["name"], (ref["macs"] / 1e6, ref["top1_err"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8, color="C3")  # fmt: skip
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel(f"top-1 error on {rows[0].get('split', '') if rows else ''} (%)")
    ax.set_title(title or "top-1 error vs MACs per depth", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.margins(x=0.15, y=0.15)  # room for the labels
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
