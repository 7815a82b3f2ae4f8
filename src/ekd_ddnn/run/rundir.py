"""The run directory: one run at a time (a lock), never a new run over an old one, the run's
record (``.hydra/``) written only once the checks have passed, and resuming a run in it.

Hydra writes nothing itself (``hydra.output_subdir: null``): a refused command leaves the
directory as it was, and a resumed run records its settings beside the original record
(``.hydra/resume-<n>/``) instead of over it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ekd_ddnn.errors import UserError
from ekd_ddnn.run.checkpoint import read_checkpoint
from ekd_ddnn.run.checks import changed_settings
from ekd_ddnn.run.files import write_text_atomically
from ekd_ddnn.run.records import RECORD, RESUMED, resumptions

log = logging.getLogger(__name__)

LOCK = ".lock"


def _holder(lock: Path) -> tuple[str, int | None]:
    """(host, pid) written in a lock file; pid None when unreadable."""
    try:
        host, _, pid = lock.read_text().strip().partition(":")
        return host, int(pid)
    except (OSError, ValueError):
        return "", None


def _alive(host: str, pid: int | None) -> bool:
    if pid is None or host != socket.gethostname():
        return True  # cannot tell for another machine: assume the run is alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (created atomically, holding ``host:pid``) while inside.

    A lock left by a process that died (``kill -9``, a crash) on this host is taken over; a
    live holder, or one on another host, refuses the run in one line.
    """
    lock = Path(run_dir) / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            host, pid = _holder(lock)
            if _alive(host, pid):
                where = f"pid {pid}" + (f" on {host}" if host != socket.gethostname() else "")
                raise UserError(
                    f"run directory {run_dir} is in use by another run ({where}); wait for it "
                    f"to end or choose another hydra.run.dir (delete {lock} if that run is dead)"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise UserError(f"cannot lock run directory {run_dir}; another run keeps taking it")
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()}:{os.getpid()}\n")
    try:
        yield
    finally:
        if _holder(lock) == (socket.gethostname(), os.getpid()):
            lock.unlink(missing_ok=True)


def run_output(run_dir: str | Path) -> frozenset[tuple[str, int, int]]:
    """A run's output in ``run_dir`` (checkpoints and results) as (name, size, mtime) of
    each file: equal before and after a command when the command wrote none."""
    run_dir = Path(run_dir)
    files = [*run_dir.glob("checkpoints/*.ckpt"), run_dir / "results.json"]
    stats = [(f, f.stat()) for f in files if f.is_file()]
    return frozenset((str(f), st.st_size, st.st_mtime_ns) for f, st in stats)


def holds_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` already holds a run's output (checkpoints or results)."""
    return bool(run_output(run_dir))


def write_record(cfg: DictConfig, run_dir: str | Path, *, resumed: bool = False) -> Path:
    """Write Hydra's record of this run (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``).

    A new run writes ``.hydra/``; a resumed one ``.hydra/resume-<n>/`` beside the original.
    """
    folder = Path(run_dir) / RECORD
    if resumed:
        earlier = resumptions(folder)
        folder = folder / f"{RESUMED}{earlier[-1][0] + 1 if earlier else 1}"
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.get()
    write_text_atomically(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomically(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    write_text_atomically(
        folder / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task))
    )
    return folder


def check_resumed_settings(cfg: DictConfig) -> None:
    """A resumed run trains what the run trained: the network, loss, optimizer, schedule,
    data and seed must match the ones stored in its last checkpoint."""
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    stored = (read_checkpoint(last).get("hyper_parameters") or {}).get("config")
    if not stored:
        return  # written before configs were stored: nothing to compare with
    refused, allowed = changed_settings(stored, OmegaConf.to_container(cfg, resolve=True))
    if refused:
        raise UserError(
            f"resume={cfg.paths.output_dir} would change what the run trains: "
            f"{'; '.join(refused)}; resume without those overrides, or start a new run"
        )
    if allowed:
        log.info("resuming with changed settings: %s", "; ".join(allowed))


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to continue from (``resume``: the run's ``last.ckpt``), continuing its
    W&B run under the same id."""
    if not cfg.get("resume"):
        return cfg.get("ckpt_path")
    out = Path(cfg.paths.output_dir)
    wandb = (cfg.get("logger") or {}).get("wandb")
    previous = sorted(out.glob("wandb/*run-*"))
    if wandb is not None and wandb.get("id") is None and previous:
        with open_dict(cfg):  # continue the same W&B run
            wandb.id = previous[-1].name.rsplit("-", 1)[-1]
            wandb.resume = "allow"
    return cfg.get("ckpt_path") or str(out / "checkpoints" / "last.ckpt")
