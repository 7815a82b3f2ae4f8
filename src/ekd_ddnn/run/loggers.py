"""What the loggers get beyond Lightning's defaults: W&B per-depth summaries and the
results table, and one W&B run per Hydra job."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger


def define_depth_metrics(loggers: Sequence[Logger]) -> None:
    """W&B: plot every metric against the global step; keep best and last per depth.

    Errors keep their minimum, accuracies their maximum, in the run summary, so a W&B table of
    runs compares each depth's best error side by side.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            for split in ("val", "test"):
                for key, best in (("top1_err", "min"), ("top5_err", "min")):
                    run.define_metric(f"{split}/{key}/*", summary=f"{best},last")
                for key in ("top1", "top5"):
                    run.define_metric(f"{split}/{key}/*", summary="max,last")


def log_results_table(loggers: Sequence[Logger], rows: Sequence[dict]) -> None:
    """W&B: the per-depth results as a ``wandb.Table`` and an accuracy-vs-MACs scatter."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        columns = ["name", "blocks", "params", "macs", "top1_err", "top5_err", "top1_acc"]
        data = [
            [
                row["name"],
                str(row["blocks"]),
                row["params"],
                row["macs"],
                row["top1_err"],
                row["top5_err"],
                None if row["top1_err"] is None else 100.0 - row["top1_err"],
            ]
            for row in rows
        ]
        table = wandb.Table(columns=columns, data=data)
        logger.experiment.log(
            {
                "results/table": table,
                "results/accuracy_vs_macs": wandb.plot.scatter(
                    table, "macs", "top1_acc", title="top-1 accuracy vs MACs per depth"
                ),
            }
        )


def finish_loggers(loggers: Sequence[Logger]) -> None:
    """End each W&B run, so the next job of a multirun starts a run of its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None:
                wandb.finish()


@contextlib.contextmanager
def keep_csv_history(loggers: Sequence[Logger]) -> Iterator[None]:
    """Resume: keep the rows an earlier part of the run wrote to ``metrics.csv``.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts. The old file is
    moved aside first and its rows are put back in front of the new ones at the end (if the
    process dies before that, they stay in ``metrics.before-resume.csv``).
    """
    moved = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "metrics.csv"
            if path.is_file():
                aside = path.with_name("metrics.before-resume.csv")
                path.replace(aside)
                moved.append((path, aside))
    try:
        yield
    finally:
        for path, aside in moved:
            rows = _read_csv(aside) + (_read_csv(path) if path.is_file() else [])
            columns = sorted({key for row in rows for key in row})
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            aside.unlink()


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
