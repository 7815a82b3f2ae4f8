"""``python -m ekd_ddnn.select ckpt_path=<file> budget.macs=<count>``: the depth for a budget.

Evaluates the checkpoint's depths (the lattice by default; or reads ``from_results=`` an
evaluation's ``results.json``), keeps those within the static budgets (MACs, params),
measures the latency of the remaining candidates on this machine where ``budget.latency_ms``
is given, and picks the lowest top-1 error (ties: the cheaper depth). Writes
``selection.json`` in the run directory, one line to the console, and with
``export.format=... export.out=...`` the chosen depth as a standalone network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import UserError
from ekd_ddnn.evaluate import check_evaluate_config, evaluate_rows
from ekd_ddnn.export import FORMATS, check_out, export_from_checkpoint
from ekd_ddnn.front import check_budget, default_device, pick_for_budget
from ekd_ddnn.results import format_macs, format_params, read_results
from ekd_ddnn.run.checkpoint import load_checkpoint, net_from_checkpoint
from ekd_ddnn.run.cli import command, run_app
from ekd_ddnn.run.files import write_text_atomically
from ekd_ddnn.timing import median_forward_seconds

log = logging.getLogger(__name__)


def candidate_rows(cfg: DictConfig) -> list[dict[str, Any]]:
    """The rows to choose from: an earlier evaluation's, or this checkpoint's evaluated now."""
    if cfg.from_results:
        rows = read_results(cfg.from_results)
        missing = [r["name"] for r in rows if "macs" not in r or "params" not in r]
        if missing:
            raise UserError(
                f"{cfg.from_results}: rows without macs/params ({missing[0]}); use a results.json "
                "written by ekd_ddnn.evaluate"
            )
        return rows
    return evaluate_rows(cfg)[0]


def add_latency(rows: list[dict], net: Any, budget: DictConfig, speed: DictConfig) -> None:
    """``latency_ms`` of the rows within the static budgets, measured here."""
    import torch

    device = torch.device(default_device(speed.device))
    size = rows[0].get("image_size", net.config["image_size"])
    x = torch.randn(speed.batch_size, net.config["in_channels"], size, size, device=device)
    views = net.shared_stats_copy()  # speed does not depend on BatchNorm statistics
    for row in rows:
        if all(budget[k] is None or row[k] <= budget[k] for k in ("macs", "params")):
            model = views.extract(row["blocks"]).eval().to(device)
            seconds = median_forward_seconds(model, x, warmup=speed.warmup, repeats=speed.repeats)
            row["latency_ms"] = round(1e3 * seconds, 4)


def select(cfg: DictConfig) -> dict[str, Any]:
    """Choose, record and optionally export the depth for ``cfg.budget``."""
    ckpt = load_checkpoint(cfg.ckpt_path)
    net = net_from_checkpoint(ckpt, cfg.ckpt_path)
    rows = candidate_rows(cfg)
    if cfg.budget.latency_ms is not None:
        add_latency(rows, net, cfg.budget, cfg.speed)
    chosen = dict(pick_for_budget(rows, OmegaConf.to_container(cfg.budget)))
    keys = ("name", "blocks", "top1_err", "top5_err", "macs", "params", "latency_ms", "split")
    selection = {k: chosen[k] for k in keys if chosen.get(k) is not None}
    selection["budget"] = {k: v for k, v in cfg.budget.items() if v is not None}
    if "latency_ms" in selection:
        selection["latency"] = {"device": default_device(cfg.speed.device),
                                "batch_size": cfg.speed.batch_size}  # fmt: skip
    selection["bn_images"] = chosen.get("bn_images", 0)
    if cfg.export.format:
        info = export_from_checkpoint(
            ckpt, net, chosen["blocks"], cfg.export.out, cfg=cfg, fmt=cfg.export.format,
            overwrite=cfg.export.overwrite,
        )  # fmt: skip
        selection["export"] = {k: info[k] for k in ("format", "path", "bytes")}
    out = Path(cfg.paths.output_dir) / "selection.json"
    write_text_atomically(out, json.dumps(selection, indent=2) + "\n")
    latency = f", {selection['latency_ms']:.3g} ms" if "latency_ms" in selection else ""
    log.info(
        "selected %s %s: top-1 error %.2f %%, %s MACs, %s params%s -> %s",
        selection["name"],
        list(selection["blocks"]),
        selection["top1_err"],
        format_macs(selection["macs"], "M"),
        format_params(selection["params"]),
        latency,
        out,
    )
    return selection


def check_select_config(cfg: DictConfig) -> None:
    """What selection can refuse before it evaluates anything."""
    check_evaluate_config(cfg)
    check_budget(OmegaConf.to_container(cfg.budget))
    if cfg.export.format:
        if cfg.export.format not in FORMATS:
            raise UserError(
                f"unknown export.format {cfg.export.format!r}; choose one of {', '.join(FORMATS)}"
            )
        if not cfg.export.out:
            raise UserError("export.format needs export.out=<file>")
        check_out(Path(cfg.export.out), cfg.export.format, overwrite=cfg.export.overwrite)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="select")
@command(check=check_select_config)
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    select(cfg)


def cli() -> None:
    """``ekd-select`` / ``python -m ekd_ddnn.select``."""
    run_app(main, "select")


if __name__ == "__main__":
    cli()
