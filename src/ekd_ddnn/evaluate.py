"""``python -m ekd_ddnn.evaluate ckpt_path=<file>``: every depth of a checkpoint, side by side.

Writes ``results.json`` / ``.csv`` / ``.md`` and ``accuracy_vs_macs.png`` to the run directory:
the paper's Table 1/2 layout (params, MACs, top-1/top-5 error) plus latency and throughput.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.calibration import recalibrate_bn
from ekd_ddnn.checkpoint import (
    data_config,
    load_checkpoint,
    loss_from_checkpoint,
    net_from_checkpoint,
)
from ekd_ddnn.errors import UserError
from ekd_ddnn.module import EKDModule
from ekd_ddnn.results import (
    add_errors,
    depth_rows,
    format_table,
    plot_accuracy_vs_macs,
    write_results,
)
from ekd_ddnn.run.checks import check_integer, check_trainer
from ekd_ddnn.run.cli import command, run_app
from ekd_ddnn.timing import measure_speed
from ekd_ddnn.train import build_trainer

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


def evaluate(cfg: DictConfig) -> tuple[list[dict], dict[str, Any]]:
    """Evaluate every trained depth of ``cfg.ckpt_path``; return the result rows."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt = load_checkpoint(cfg.ckpt_path)
    net = net_from_checkpoint(ckpt, cfg.ckpt_path)
    module = EKDModule(net, loss_from_checkpoint(ckpt))
    datamodule = instantiate(data_config(ckpt, cfg.get("data")))
    split = _split(cfg.split, datamodule.has_test_split)
    for key in ("num_classes", "in_channels"):
        if getattr(datamodule, key) != net.config[key]:
            raise UserError(
                f"the checkpoint's network has {key}={net.config[key]} but the data has "
                f"{key}={getattr(datamodule, key)}; evaluate on data of the kind it was trained on"
            )
    recalibrate_bn(net, datamodule, cfg.recalibrate_bn, seed=cfg.seed)
    trainer = build_trainer(cfg.trainer, logger=False, enable_checkpointing=False)
    run = trainer.test if split == "test" else trainer.validate
    run(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # costs at the size evaluated, which data.image_size may set apart from the trained one
    size = datamodule.image_size
    rows = add_errors(depth_rows(net, module.depths, image_size=size), metrics, split)
    if size != net.config["image_size"]:
        for row in rows:
            row["image_size"] = size

    if trainer.is_global_zero:
        if cfg.speed.enabled:
            device = cfg.speed.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            shape = (net.config["in_channels"], size, size)
            for row in rows:
                row.update(
                    measure_speed(
                        net.extract(row["blocks"]),
                        shape,
                        batch_size=cfg.speed.batch_size,
                        device=device,
                        warmup=cfg.speed.warmup,
                        repeats=cfg.speed.repeats,
                    )
                )
        out = Path(cfg.paths.output_dir)
        title = f"{Path(cfg.ckpt_path).name}: every depth on {split}"
        if cfg.recalibrate_bn:
            title += f", BatchNorm recalibrated on {cfg.recalibrate_bn} images"
        write_results(rows, out, title=title)
        plot_accuracy_vs_macs(rows, out / "accuracy_vs_macs.png", title=title)
        log.info("%s\nresults: %s", format_table(rows), out / "results.json")
    return rows, {"module": module, "datamodule": datamodule, "trainer": trainer}


def check_evaluate_config(cfg: DictConfig) -> None:
    """What evaluation can refuse before it reads data or writes anything."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise UserError(
            "pass the checkpoint to evaluate: ckpt_path=<run dir>/checkpoints/best.ckpt"
        )
    check_integer(cfg.seed, "seed")
    check_integer(cfg.recalibrate_bn, "recalibrate_bn", minimum=0)
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
