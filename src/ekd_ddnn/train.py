"""``python -m ekd_ddnn.train``: train a DDNN, evaluate every depth, write the results table.

Data flows one way: config -> (datamodule, EKDModule(net, loss)) -> Trainer -> checkpoints,
logs -> ``results.json`` / ``results.md`` in the run directory.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import UserError, report_user_errors, run_app
from ekd_ddnn.launch import ddp_job_scope, use_hydra_job_rank_command
from ekd_ddnn.loggers import (
    define_depth_metrics,
    finish_loggers,
    keep_csv_history,
    log_results_table,
)
from ekd_ddnn.module import EKDModule
from ekd_ddnn.results import add_errors, depth_rows, format_table, write_results


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
    )


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to continue from; refuses to start a new run over an old one."""
    out = Path(cfg.paths.output_dir)
    if cfg.get("resume"):
        last = out / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise UserError(
                f"nothing to resume: {last} does not exist; pass resume=<run dir> of a run "
                "that saved a checkpoint (or resume=latest)"
            )
        wandb = (cfg.get("logger") or {}).get("wandb")
        previous = sorted(out.glob("wandb/*run-*"))
        if wandb is not None and wandb.get("id") is None and previous:
            with open_dict(cfg):  # continue the same W&B run
                wandb.id = previous[-1].name.rsplit("-", 1)[-1]
                wandb.resume = "allow"
        return cfg.get("ckpt_path") or str(last)
    if any(out.glob("checkpoints/*.ckpt")) or (out / "results.json").is_file():
        raise UserError(
            f"run directory {out} already holds a run; continue it with resume={out}, "
            "or choose another hydra.run.dir"
        )
    return cfg.get("ckpt_path")


def build_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """Instantiate the Trainer; a setting the machine cannot satisfy is a user error."""
    try:
        return instantiate(trainer_cfg, **kwargs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        if type(cause).__name__ == "MisconfigurationException" or isinstance(cause, ValueError):
            reason = str(cause).strip().splitlines()[0]
            raise UserError(f"cannot set up the trainer: {reason}; check trainer.*") from None
        raise


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train, then evaluate every depth on the test split (validation where there is none).

    Returns the final metrics and the objects built (for tests and callers).
    """
    ckpt_path = resume_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    loggers = instantiate_all(cfg.get("logger"))
    trainer = build_trainer(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=loggers
    )
    with contextlib.ExitStack() as stack:
        stack.callback(finish_loggers, trainer.loggers)
        if cfg.get("resume"):
            stack.enter_context(keep_csv_history(trainer.loggers))
        define_depth_metrics(trainer.loggers)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        # results on the best checkpoint's test split (validation where there is none);
        # with test=false, the last validation epoch's
        split = "test" if datamodule.has_test_split and cfg.get("test") else "val"
        if cfg.get("test"):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            evaluate = trainer.test if split == "test" else trainer.validate
            evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

        if trainer.is_global_zero:
            rows = add_errors(depth_rows(module.net, module.depths), metrics, split)
            for row in rows:
                row["seed"] = cfg.seed
            title = f"{cfg.task_name}: {module.names[0]} DDNN"
            write_results(rows, cfg.paths.output_dir, title=title)
            log_results_table(trainer.loggers, rows)
            print(format_table(rows))
            print(f"results: {Path(cfg.paths.output_dir) / 'results.json'}")
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors
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


if __name__ == "__main__":
    run_app(main, CONFIG_DIR)
