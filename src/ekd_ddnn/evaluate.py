"""``python -m ekd_ddnn.evaluate ckpt_path=<file> [depths=trained|lattice|[[...]]]``: depths
of a checkpoint side by side.

Writes ``results.json`` / ``.csv`` / ``.md`` and ``front.png`` to the run directory: the
paper's Table 1/2 layout (params, MACs, top-1/top-5 error) plus latency and throughput, whether
each depth was trained, the images its BatchNorm statistics were re-estimated from, and
whether it is on the accuracy-cost front.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import UserError
from ekd_ddnn.front import checkpoint_depths, choose_depths, default_device, evaluate_depths
from ekd_ddnn.models import DepthDynamicNet
from ekd_ddnn.results import format_table, plot_front, read_reference, write_results
from ekd_ddnn.run.checkpoint import data_config, load_checkpoint, net_from_checkpoint
from ekd_ddnn.run.checks import check_integer, check_seed, check_trainer
from ekd_ddnn.run.cli import command, run_app
from ekd_ddnn.run.trainer import build_trainer
from ekd_ddnn.timing import measure_speed

log = logging.getLogger(__name__)


def _split(requested: str, has_test: bool) -> str:
    if requested not in ("auto", "test", "val"):
        raise UserError(f"split must be auto, test or val, got {requested!r}")
    if requested == "test" and not has_test:
        raise UserError("the data has no test split; use split=val (or split=auto)")
    return (
        "test"
        if requested == "auto" and has_test
        else ("val" if requested == "auto" else requested)
    )


def load_for_evaluation(cfg: DictConfig) -> tuple[Any, DepthDynamicNet, Any, str]:
    """(checkpoint, net, data module, split) of ``cfg.ckpt_path``."""
    ckpt = load_checkpoint(cfg.ckpt_path)
    net = net_from_checkpoint(ckpt, cfg.ckpt_path)
    datamodule = instantiate(data_config(ckpt, cfg.get("data")))
    split = _split(cfg.split, datamodule.has_test_split)
    for key in ("num_classes", "in_channels"):
        if getattr(datamodule, key) != net.config[key]:
            raise UserError(
                f"the checkpoint's network has {key}={net.config[key]} but the data has "
                f"{key}={getattr(datamodule, key)}; evaluate on data of the kind it was trained on"
            )
    return ckpt, net, datamodule, split


def evaluate_rows(cfg: DictConfig) -> tuple[list[dict], dict[str, Any]]:
    """The result rows of the depths ``cfg.depths`` of ``cfg.ckpt_path`` (no timing)."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt, net, datamodule, split = load_for_evaluation(cfg)
    trained, trained_stats = checkpoint_depths(ckpt, net)
    spec = cfg.depths if isinstance(cfg.depths, str) else OmegaConf.to_container(cfg.depths)
    depths = choose_depths(net, trained, spec, max_depths=cfg.max_depths, seed=cfg.seed)
    rows = evaluate_depths(
        net,
        depths,
        datamodule,
        lambda **kw: build_trainer(cfg.trainer, logger=False, enable_checkpointing=False, **kw),
        split=split,
        trained=trained,
        recalibrate=cfg.recalibrate_bn,
        per_pass=cfg.depths_per_pass,
        seed=cfg.seed,
        trained_stats=trained_stats,
    )
    return rows, {"net": net, "datamodule": datamodule, "depths": depths}


def evaluate(cfg: DictConfig) -> tuple[list[dict], dict[str, Any]]:
    """Evaluate the depths ``cfg.depths`` of ``cfg.ckpt_path``; write and return the rows."""
    rows, objects = evaluate_rows(cfg)
    if rank_zero_only.rank != 0:
        return rows, objects
    net = objects["net"]
    if cfg.speed.enabled:
        device = default_device(cfg.speed.device)
        size = objects["datamodule"].image_size
        shape = (net.config["in_channels"], size, size)
        views = net.shared_stats_copy()  # speed does not depend on BatchNorm statistics
        for row in rows:
            row.update(
                measure_speed(
                    views.extract(row["blocks"]),
                    shape,
                    batch_size=cfg.speed.batch_size,
                    device=device,
                    warmup=cfg.speed.warmup,
                    repeats=cfg.speed.repeats,
                )
            )
    out = Path(cfg.paths.output_dir)
    split = rows[0]["split"]
    title = f"{Path(cfg.ckpt_path).name}: {len(rows)} depths on {split}"
    recalibrated = {row["bn_images"] for row in rows} - {0}
    if recalibrated:
        title += f", BatchNorm re-estimated from {max(recalibrated)} images"
    write_results(rows, out, title=title)
    reference = read_reference(cfg.reference) if cfg.get("reference") else None  # checked
    plot_front(rows, out / "front.png", title=title, reference=reference)
    log.info("%s\nresults: %s", format_table(rows), out / "results.json")
    return rows, objects


def check_depth_options(cfg: DictConfig) -> None:
    """``depths``, ``max_depths``, ``depths_per_pass`` and ``recalibrate_bn`` are usable."""
    if cfg.recalibrate_bn != "auto":
        check_integer(cfg.recalibrate_bn, "recalibrate_bn", minimum=0)
    if cfg.max_depths is not None:
        check_integer(cfg.max_depths, "max_depths", minimum=0)
    check_integer(cfg.depths_per_pass, "depths_per_pass", minimum=1)
    if isinstance(cfg.depths, str) and cfg.depths not in ("trained", "lattice"):
        raise UserError(
            f"depths must be trained, lattice or a list such as [[3,2,3],[1,1,1]], got "
            f"{cfg.depths!r}"
        )


def check_evaluate_config(cfg: DictConfig) -> None:
    """What evaluation can refuse before it reads data or writes anything."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise UserError(
            "pass the checkpoint to evaluate: ckpt_path=<run dir>/checkpoints/best.ckpt"
        )
    check_seed(cfg.seed)
    check_depth_options(cfg)
    check_trainer(cfg.trainer, allow_cpu_oversubscription=cfg.allow_cpu_oversubscription)
    speed = cfg.speed
    if speed.enabled:
        check_integer(speed.batch_size, "speed.batch_size", minimum=1)
        check_integer(speed.warmup, "speed.warmup", minimum=0)
        check_integer(speed.repeats, "speed.repeats", minimum=1)
        if speed.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"speed.device must be auto, cpu or cuda, got {speed.device!r}")
        if speed.device == "cuda" and not torch.cuda.is_available():
            raise UserError(
                "speed.device=cuda but no CUDA GPU is visible; use speed.device=cpu (or auto), "
                "or speed.enabled=false"
            )
    if cfg.get("reference"):
        read_reference(cfg.reference)  # before any evaluation: a bad file costs nothing
    load_checkpoint(cfg.ckpt_path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@command(check=check_evaluate_config)
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


def cli() -> None:
    """``ekd-evaluate`` / ``python -m ekd_ddnn.evaluate``."""
    run_app(main, "evaluate")


if __name__ == "__main__":
    cli()
