"""``python -m ekd_ddnn.train``: train a DDNN, evaluate every depth, write the results table.

Data flows one way: config -> (datamodule, EKDModule(net, loss)) -> Trainer -> checkpoints,
logs -> ``results.json`` / ``results.md`` in the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import report_user_errors, run_app
from ekd_ddnn.launch import ddp_job_scope, use_hydra_job_rank_command
from ekd_ddnn.loggers import define_depth_metrics, finish_loggers, log_results_table
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


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train, then evaluate every depth on the test split (validation where there is none).

    Returns the final metrics and the objects built (for tests and callers).
    """
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=loggers
    )
    try:
        define_depth_metrics(trainer.loggers)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        split = "test" if datamodule.has_test_split else "val"
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
    finally:
        finish_loggers(trainer.loggers)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers when set."""
    use_hydra_job_rank_command()
    with ddp_job_scope():
        metrics, _ = train(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    run_app(main, CONFIG_DIR)
