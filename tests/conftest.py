"""Shared fixtures: compose the real Hydra configs for a run inside ``tmp_path``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ekd_ddnn import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-subset"


def compose_config(name: str, overrides: list[str], out_dir: Path) -> DictConfig:
    """Compose ``conf/<name>.yaml`` as the command line would, with its run dir in out_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def compose_train(tmp_path):
    """``compose_train(*overrides)``: a train config writing into ``tmp_path``."""
    return lambda *overrides: compose_config("train", list(overrides), tmp_path)


def run_cli(
    module: str, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m ekd_ddnn.<module> args`` as a user would; capture its output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # tests.helpers
    return subprocess.run(
        [sys.executable, "-m", f"ekd_ddnn.{module}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """One real training run of the default experiment (6 epochs), shared by the tests
    that need a trained checkpoint; returns its run directory."""
    from ekd_ddnn.train import train

    out = tmp_path_factory.mktemp("digits_run")
    train(compose_config("train", ["trainer.max_epochs=6"], out))
    return out


@contextlib.contextmanager
def mounted_tmpfs(path: Path, *, size: str = "64m", read_only: bool = False):
    """A real second filesystem (tmpfs) at ``path`` while inside; skips the test with the
    reason where mounting is impossible (not root, no mount permission in a container)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
