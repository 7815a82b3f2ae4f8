"""``python -m ekd_ddnn.train``: train a DDNN, evaluate every depth, write the results table.

Data flows one way: config -> (datamodule, EKDModule(net, loss)) -> Trainer -> checkpoints,
logs -> ``results.json`` / ``results.md`` in the run directory.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import UserError
from ekd_ddnn.module import EKDModule
from ekd_ddnn.results import add_errors, depth_rows, format_table, write_results
from ekd_ddnn.run.checkpoint import read_checkpoint
from ekd_ddnn.run.checks import (
    check_arguments,
    check_optimizer,
    check_seed,
    check_trainer,
)
from ekd_ddnn.run.cli import command, run_app
from ekd_ddnn.run.launch import ddp_job_scope, use_hydra_job_rank_command
from ekd_ddnn.run.loggers import (
    define_depth_metrics,
    finish_loggers,
    keep_csv_history,
    log_results_table,
)
from ekd_ddnn.run.rundir import check_resumed_settings, resume_checkpoint
from ekd_ddnn.run.trainer import build_trainer, trainer_settings_errors

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def build_module(cfg: DictConfig) -> EKDModule:
    """The EKDModule of ``cfg``: network, loss, optimizer and schedule."""
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return EKDModule(
        net=instantiate(cfg.model),
        loss=instantiate(cfg.ekd),
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        no_weight_decay_bn_bias=cfg.no_weight_decay_bn_bias,
        config=OmegaConf.to_container(cfg, resolve=True),
        seed=cfg.seed,
    )


def check_train_config(cfg: DictConfig) -> None:
    """Everything a training run can refuse before it writes anything (DESIGN section 5)."""
    check_seed(cfg.seed)
    for group in ("data", "model", "ekd", "scheduler"):
        check_arguments(cfg.get(group), group)
    check_optimizer(cfg.optimizer)
    check_trainer(cfg.trainer, allow_cpu_oversubscription=cfg.allow_cpu_oversubscription)
    if cfg.trainer.get("sync_batchnorm") and cfg.model.get("bn_stats") == "private":
        raise UserError(
            "trainer.sync_batchnorm=true replaces the BatchNorm layers that hold each depth's "
            "statistics (model.bn_stats=private) and drops them; use one of the two"
        )
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)  # missing, unreadable, corrupt or code-running: one line
    if cfg.get("resume"):
        check_resumed_settings(cfg)


def check_monitors(callbacks: list[Any], module: EKDModule) -> None:
    """Every callback ``monitor`` (checkpoints, early stopping) names a metric we log."""
    keys = module.metric_keys()
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor is not None and monitor not in keys:
            close = difflib.get_close_matches(monitor, sorted(keys), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(
                f"{type(callback).__name__} monitors {monitor!r}, which this run never logs"
                f"{hint} (logged: val/top1_err/<net>, val/top1_err/mean, ...)"
            )


def check_trained(trainer: L.Trainer, module: EKDModule, cfg: DictConfig) -> None:
    """Results come only from a net that was trained and is evaluated now: a fit that made
    no training step has an untrained net, and one that continued a checkpoint which had
    already reached the end of training, with ``test=false``, measured nothing (its results
    would be empty and replace the run's)."""
    if trainer.global_step == 0:
        raise UserError(
            "training made no step (check trainer.limit_train_batches and trainer.max_time); "
            "nothing was written"
        )
    if module.fit_start_step in (None, trainer.global_step) and not cfg.get("test"):
        max_steps = cfg.trainer.get("max_steps", -1)
        by_steps = max_steps not in (None, -1) and trainer.global_step >= max_steps
        key = "max_steps" if by_steps else "max_epochs"
        raise UserError(
            f"the checkpoint had already reached trainer.{key}={cfg.trainer.get(key)}: nothing "
            "was trained or measured and results.json, if any, is unchanged; raise "
            f"trainer.{key} to train on, or pass test=true to evaluate the best checkpoint"
        )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train, then evaluate every depth on the test split (validation where there is none).

    Returns the final metrics and the objects built (for tests and callers).
    """
    ckpt_path = resume_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    module.net.check_input(datamodule.batch_size)
    loggers = instantiate_all(cfg.get("logger"))
    callbacks = instantiate_all(cfg.get("callbacks"))
    check_monitors(callbacks, module)
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers)
    with contextlib.ExitStack() as stack:
        stack.callback(finish_loggers, trainer.loggers)
        if cfg.get("resume"):
            stack.enter_context(keep_csv_history(trainer.loggers))
        define_depth_metrics(trainer.loggers)
        with trainer_settings_errors("cannot train"):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        module.check_finite()  # steps after the last check: no results from a diverged net
        check_trained(trainer, module, cfg)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        # results on the best checkpoint's test split (validation where there is none);
        # with test=false, the last validation epoch's
        split = "test" if datamodule.has_test_split and cfg.get("test") else "val"
        if cfg.get("test"):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            evaluate = trainer.test if split == "test" else trainer.validate
            with trainer_settings_errors("cannot evaluate"):
                evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

        if trainer.is_global_zero:
            rows = add_errors(depth_rows(module.net, module.depths), metrics, split)
            for row in rows:
                row["seed"] = cfg.seed
            title = f"{cfg.task_name}: {module.names[0]} DDNN"
            write_results(rows, cfg.paths.output_dir, title=title)
            log_results_table(trainer.loggers, rows)
            log.info(
                "%s\nresults: %s", format_table(rows), Path(cfg.paths.output_dir) / "results.json"
            )
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@command(check=check_train_config)
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers when set."""
    use_hydra_job_rank_command()
    try:
        with ddp_job_scope():
            metrics, _ = train(cfg)
    except SIGTERMException:
        saved = Path(cfg.paths.output_dir) / "checkpoints" / "interrupted.ckpt"
        print(f"stopped by SIGTERM; continue with ckpt_path={saved}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


def cli() -> None:
    """``ekd-train`` / ``python -m ekd_ddnn.train``."""
    run_app(main, "train")


if __name__ == "__main__":
    cli()
