"""Starting DDP ranks from a Hydra job.

Lightning's ``ddp`` strategy starts ranks 1..N-1 by re-running the command line
(``lightning.pytorch.strategies.launchers.subprocess_script``). Under Hydra it re-runs
``sys.argv``, which in a multirun still holds ``-m`` and the sweep (``ekd.w=0,1,2``, or an
Optuna ``hparams_search``): every rank would start a sweep of its own, with its own run
directories and, under Optuna, its own sampled parameters. The command here starts a rank as
*this job only*: the job's resolved overrides (the values this job trains with) and its run
directory, with no config written by the extra ranks.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, to_absolute_path


def hydra_job_rank_command(local_rank: int) -> tuple[Sequence[str], str]:
    """(command, cwd) that starts DDP rank ``local_rank`` of the current Hydra job."""
    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")]
    command += [
        "hydra.mode=RUN",  # a sweep config (hparams_search) sets MULTIRUN
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def use_hydra_job_rank_command() -> None:
    """Make Lightning's subprocess launcher start ranks with :func:`hydra_job_rank_command`.

    Lightning offers no hook for this command, so its module-level helper is replaced.
    """
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = hydra_job_rank_command


# set in this process by Lightning's launcher when it starts the other ranks
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def ddp_job_scope() -> Iterator[None]:
    """Run one training job so that the next job of a multirun can start DDP afresh.

    Lightning's launcher leaves ``LOCAL_RANK`` etc. in rank 0's environment (the next job
    would then take them for an external launcher and start no ranks) and leaves the process
    group initialised (its peers have exited). Both are undone when the job ends; variables
    set before the job (torchrun, SLURM) are kept.
    """
    before = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
