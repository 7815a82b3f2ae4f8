"""``python -m ekd_ddnn.study study=<name>``: Table 1's columns over seeds, in one table.

For one pairing (a full-net and its sub-nets) a study trains, for every seed, the columns of
``ekd_ddnn/conf/study/<name>.yaml``; the paper's are ``individual`` (each depth alone, one job per
depth), ``ddnn`` (cross-entropy only), ``ekd`` and ``ekd_no_ensemble`` (Fig. 3's ablation).
Each job is an ordinary ``python -m ekd_ddnn.train`` run in ``<study dir>/<job>/seed<k>/``;
then ``study.json`` / ``study.csv`` / ``study.md`` hold the mean +- std top-1 error per depth
and column and the paired (same-seed) differences between columns.

Running the same command again skips the finished jobs (``results.json`` present), continues
interrupted ones from their last checkpoint, and refuses to mix in jobs run with other settings.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import UserError
from ekd_ddnn.results import read_overrides, read_results, write_table
from ekd_ddnn.run.checks import MAX_SEED
from ekd_ddnn.run.cli import report_user_errors, run_app

# every job writes its output to a log file; no progress bar
QUIET = ["callbacks.rich_progress_bar=null", "++trainer.enable_progress_bar=false"]


@dataclass
class Job:
    """One training run of a study: a column (for one depth, or all) and a seed."""

    column: str
    seed: int
    name: str  # the job's folder: the column, or ``<column>-<depth name>``
    overrides: list[str]
    out: Path = field(init=False)
    root: Path = field(repr=False, default=Path("."))

    def __post_init__(self) -> None:
        self.out = self.root / self.name / f"seed{self.seed}"

    @property
    def done(self) -> bool:
        return (self.out / "results.json").is_file()

    @property
    def started(self) -> bool:
        return (self.out / "checkpoints" / "last.ckpt").is_file()

    def shell(self) -> str:
        """The command as a user would type it."""
        return " ".join(["python", *self.command()[1:]])

    def command(self) -> list[str]:
        """The ``ekd_ddnn.train`` command line (continuing the run where it has a checkpoint)."""
        args = [*self.overrides, f"hydra.run.dir={self.out}"]
        if self.started and not self.done:
            args.append(f"resume={self.out}")
        return [sys.executable, "-m", "ekd_ddnn.train", *args]


def compose_train(overrides: list[str], what: str) -> DictConfig:
    """The train config a job's command line composes; a clear error where it does not."""
    try:
        if GlobalHydra.instance().is_initialized():  # inside the study's own Hydra app
            return compose("train", overrides=overrides)
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=overrides)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"{what} does not compose: {reason}; check study.overrides") from None


def _depth_names(train_overrides: list[str]) -> list[tuple[list[int], str]]:
    """(blocks, name) of every depth the composed train config trains, full-net first."""
    net = instantiate(compose_train(train_overrides, "the study's train config").model)
    return [(list(d), net.name_of(d)) for d in net.depths]


def check_seeds(seeds: object) -> list[int]:
    """``study.seeds`` as a list: non-empty, distinct integers in ``0 .. 2**32 - 1``."""
    value = OmegaConf.to_container(seeds) if OmegaConf.is_config(seeds) else seeds
    if isinstance(value, list) and not value:
        raise UserError("study.seeds is empty; give at least one seed, e.g. study.seeds=[0,1,2]")
    ints = isinstance(value, list) and all(
        isinstance(s, int) and not isinstance(s, bool) for s in value
    )
    if not ints:
        raise UserError(
            f"study.seeds must be a list of integers, e.g. study.seeds=[0,1,2]; got {value!r}"
        )
    out = [s for s in value if not 0 <= s <= MAX_SEED]
    if out:
        raise UserError(
            f"study.seeds must be between 0 and {MAX_SEED} (the seeds Lightning accepts); "
            f"got {value!r}"
        )
    twice = sorted({s for s in value if value.count(s) > 1})
    if twice:
        raise UserError(f"study.seeds lists {twice} more than once; give each seed once")
    return value


def check_parallel(parallel: object) -> int:
    """``parallel``: an integer >= 1 (jobs at the same time)."""
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise UserError(
            f"parallel must be an integer >= 1 (jobs run at the same time), got {parallel!r}"
        )
    return parallel


def plan(study: DictConfig, root: Path, extra: Sequence[str] = ()) -> tuple[list[Job], list[str]]:
    """Every job of ``study`` (seed-major, so that early seeds finish first) and the depth
    names; ``extra`` train overrides follow the study's own in every job."""
    base = [*study.overrides, *extra]
    unknown = [c for c in study.per_depth if c not in study.columns]
    pairs = [c for pair in study.differences for c in pair if c not in study.columns]
    if unknown or pairs:
        raise UserError(
            f"study.per_depth / study.differences name column(s) {sorted({*unknown, *pairs})} "
            f"that study.columns does not define ({', '.join(study.columns)})"
        )
    check_seeds(study.seeds)
    depths = _depth_names(base)
    jobs = []
    for seed in study.seeds:
        for column, column_overrides in study.columns.items():
            common = [*base, *column_overrides, f"seed={seed}", *QUIET]
            if column not in study.per_depth:
                jobs.append(Job(column, seed, column, common, root=root))
                continue
            for blocks, name in depths:
                alone = [f"model.blocks=[{','.join(map(str, blocks))}]", "model.subnets=[]"]
                jobs.append(Job(column, seed, f"{column}-{name}", [*common, *alone], root=root))
    for job in jobs:  # fail before training anything: every job's config must compose
        _check_job(job)
    return jobs, [name for _, name in depths]


def _check_job(job: Job) -> None:
    """The job's config composes, a run already in its folder had the same overrides, and a
    finished one left a readable ``results.json``."""
    compose_train(job.overrides, f"study job {job.name}")
    if (job.out / ".hydra" / "overrides.yaml").is_file():
        previous = read_overrides(job.out)
        if previous != job.overrides:
            changed = " ".join(sorted(set(previous) ^ set(job.overrides)))
            raise UserError(
                f"{job.out} was run with other settings (differing: {changed}); give this study "
                "another name (study.name=...) or move that directory away"
            )
    if job.done:
        read_results(job.out / "results.json")


def run_job(job: Job, threads: int) -> tuple[Job, int, float]:
    """Run one job to completion; its output goes to ``<job dir>/job.log``."""
    job.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "ignore")
    start = time.perf_counter()
    with open(job.out / "job.log", "a") as log:
        log.write(f"$ {job.shell()}\n")
        log.flush()
        run = subprocess.run(job.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
    return job, run.returncode, time.perf_counter() - start


def collect(jobs: Sequence[Job]) -> list[dict]:
    """One row per (column, seed, depth) of the finished jobs: top-1 error and split."""
    rows = []
    for job in jobs:
        if not job.done:
            continue
        for r in read_results(job.out / "results.json"):
            rows.append(
                {"column": job.column, "seed": job.seed, "name": r["name"],
                 "top1_err": r["top1_err"], "split": r.get("split"), "job": job.name}
            )  # fmt: skip
    return rows


def _stats(values: list[float]) -> dict:
    mean = statistics.mean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values)}


def summarise(
    rows: list[dict], names: list[str], columns: list[str], differences: list[list[str]]
) -> dict:
    """Mean +- sample std over seeds per depth and column; paired differences per seed."""
    err = {(r["column"], r["seed"], r["name"]): r["top1_err"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    table = {
        name: {c: _stats([err[c, s, name] for s in seeds if (c, s, name) in err]) for c in columns}
        for name in names
    }
    diffs = {}
    for a, b in differences:
        diffs[f"{a} - {b}"] = {
            name: _stats(
                [
                    err[a, s, name] - err[b, s, name]
                    for s in seeds
                    if (a, s, name) in err and (b, s, name) in err
                ]
            )  # fmt: skip
            for name in names
        }
    return {"top1_err": table, "differences": diffs, "seeds": seeds}


def _cell(stats: dict, signed: bool = False) -> str:
    if stats["mean"] is None:
        return "-"
    mean = f"{stats['mean']:+.2f}" if signed else f"{stats['mean']:.2f}"
    spread = f" ± {stats['std']:.2f}" if stats["std"] is not None else ""
    return f"{mean}{spread} (n={stats['n']})"


def format_study(summary: dict, names: list[str], columns: list[str], split: str) -> str:
    """The Markdown tables of ``study.md``."""
    lines = [
        f"Top-1 error % on the {split} split, mean ± sample std over seeds "
        f"{summary['seeds']} (n = finished seeds)",
        "",
        "| net | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        cells = [_cell(summary["top1_err"][name][c]) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if summary["differences"]:
        pairs = list(summary["differences"])
        lines += [
            "",
            "Paired differences in percentage points (same seed; negative: the first column "
            "has the lower error), mean ± std over seeds",
            "",
            "| net | " + " | ".join(pairs) + " |",
            "|---|" + "---|" * len(pairs),
        ]
        for name in names:
            cells = [_cell(summary["differences"][p][name], signed=True) for p in pairs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_study(root: Path, study: DictConfig, jobs: list[Job], names: list[str]) -> dict:
    """Write ``study.json``, ``study.csv`` (one row per job and depth) and ``study.md``."""
    rows = collect(jobs)
    columns = list(study.columns)
    summary = summarise(rows, names, columns, [list(p) for p in study.differences])
    split = rows[0]["split"] if rows else "val"
    document = {"study": OmegaConf.to_container(study), **summary, "rows": rows}
    markdown = f"# Study {study.name}\n\n" + format_study(summary, names, columns, split)
    write_table(root, "study", rows, markdown, document=document)
    return summary


def study(cfg: DictConfig) -> dict:
    """Run every unfinished job of ``cfg.study`` and write the study table."""
    root = Path(cfg.paths.output_dir)
    check_parallel(cfg.parallel)
    jobs, names = plan(cfg.study, root, list(cfg.overrides))
    todo = [job for job in jobs if not job.done]
    print(f"study {cfg.study.name}: {len(jobs)} jobs, {len(jobs) - len(todo)} finished, in {root}")
    if cfg.dry_run:
        for job in todo:
            print(job.shell())
        return {}
    threads = max(1, (os.cpu_count() or 1) // cfg.parallel)
    failed = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
        futures = [pool.submit(run_job, job, threads) for job in todo]
        for done, future in enumerate(as_completed(futures), 1):
            job, code, wall = future.result()
            state = "done" if code == 0 and job.done else f"FAILED (exit {code})"
            print(f"[{done}/{len(todo)}] {job.name} seed {job.seed}: {state} in {wall:.0f} s")
            if state != "done":
                failed.append(f"{job.out / 'job.log'}")
    wall = time.perf_counter() - start
    summary = write_study(root, cfg.study, jobs, names)
    print((root / "study.md").read_text(), end="")
    print(f"wrote {root / 'study.md'} ({len(todo)} jobs run in {wall / 60:.1f} min)")
    if failed:
        raise UserError(
            f"{len(failed)} job(s) failed, see {', '.join(failed)}; fix the cause and run the "
            "same command again to finish them (finished jobs are kept)"
        )
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="study")
@report_user_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    study(cfg)


def cli() -> None:
    """``ekd-study`` / ``python -m ekd_ddnn.study``."""
    run_app(main, "study")


if __name__ == "__main__":
    cli()
