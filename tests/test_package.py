"""The package as users install it: a wheel built from the repository, installed
non-editable (``pip install --no-deps --target``), run from a directory outside the repo.

The venv's editable install (``src/`` on ``sys.path`` through a ``.pth`` file) comes after
``PYTHONPATH``, so the children import the installed copy; ``test_children_import_the_wheel``
proves it rather than assuming it.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = {
    f"ekd-{name}": f"ekd_ddnn.{name}:cli"
    for name in ["train", "evaluate", "export", "select", "study", "aggregate", "summary"]
}
TABLE2_RESNET50 = "| resnet50 | [3,4,6,3] | 25.6M | 4.09G |"
SRC = REPO / "src"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _source_copy(dest: Path) -> Path:
    """The files the build reads (top-level files + ``src/``), without build leftovers.

    Building in the repository itself would leave a ``build/`` folder there, whose stale
    copies of deleted modules setuptools puts into later wheels, and races between runs.
    """
    dest.mkdir()
    for item in REPO.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    shutil.copytree(
        SRC,
        dest / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"),
    )
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """Build the wheel, install it into ``<tmp>/site``; returns wheel, site and a fresh cwd."""
    pytest.importorskip("pip", reason="the venv has no pip to build and install a wheel")
    tmp = tmp_path_factory.mktemp("package")
    source = _source_copy(tmp / "source")
    dist = tmp / "dist"
    # No build isolation where the venv's setuptools satisfies [build-system]: offline-safe.
    if int(version("setuptools").split(".")[0]) >= 77:
        build = _pip(
            "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source)
        )
    else:
        build = _pip("wheel", "--no-deps", "-w", str(dist), str(source))
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("ekd_ddnn-*.whl")

    site = tmp / "site"
    install = _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    assert install.returncode == 0, install.stdout + install.stderr
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return {"wheel": wheel, "site": site, "cwd": cwd}


def _run(installed: dict[str, Path], *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the fresh directory with only the installed copy on ``PYTHONPATH``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(installed["site"]),
        "PYTHONWARNINGS": "ignore",
        "PYTHONDONTWRITEBYTECODE": "1",  # so "nothing written in site" is exact
    }
    return subprocess.run(
        cmd, cwd=installed["cwd"], env=env, capture_output=True, text=True, timeout=timeout
    )


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def test_wheel_carries_configs_modules_and_scripts(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))

    # every Hydra config, and nothing but the package and its metadata
    assert "ekd_ddnn/conf/train.yaml" in names
    repo_yaml = {p.relative_to(SRC).as_posix() for p in (SRC / "ekd_ddnn" / "conf").rglob("*.yaml")}
    assert {n for n in names if n.endswith(".yaml")} == repo_yaml
    assert all(n.startswith(("ekd_ddnn/", f"{dist_info}/")) for n in names), sorted(names)
    # every module (a subpackage without __init__.py would silently drop out)
    repo_py = {
        p.relative_to(SRC).as_posix()
        for p in (SRC / "ekd_ddnn").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert {n for n in names if n.endswith(".py")} == repo_py

    # the six console scripts, in the metadata and installed
    entry_points = configparser.ConfigParser()
    entry_points.read_string(
        zipfile.ZipFile(installed["wheel"]).read(f"{dist_info}/entry_points.txt").decode()
    )
    assert dict(entry_points["console_scripts"]) == SCRIPTS
    for script in SCRIPTS:
        assert os.access(installed["site"] / "bin" / script, os.X_OK), script


def test_children_import_the_wheel(installed):
    """The installed copy, not the repo's editable one, is what the children run."""
    probe = _run(
        installed,
        sys.executable,
        "-c",
        "import ekd_ddnn, ekd_ddnn.summary; print(ekd_ddnn.__file__); print(ekd_ddnn.CONFIG_DIR)",
    )
    assert probe.returncode == 0, probe.stderr
    module_file, config_dir = (Path(line) for line in probe.stdout.split())
    assert module_file.is_relative_to(installed["site"]), module_file
    assert config_dir == installed["site"] / "ekd_ddnn" / "conf"


def test_summary_from_the_wheel(installed):
    """``python -m ekd_ddnn.summary`` and the ``ekd-summary`` script, outside the repo."""
    before = _tree(installed["site"])
    for cmd in [
        [sys.executable, "-m", "ekd_ddnn.summary", "model=resnet50"],
        [str(installed["site"] / "bin" / "ekd-summary"), "model=resnet50"],
    ]:
        result = _run(installed, *cmd)
        assert result.returncode == 0, (cmd, result.stdout, result.stderr)
        assert TABLE2_RESNET50 in result.stdout, (cmd, result.stdout)
    assert _tree(installed["site"]) == before


@pytest.mark.slow
def test_train_from_the_wheel_writes_under_cwd(installed):
    """One epoch on digits: the run lands under the launch directory, never in site."""
    before = _tree(installed["site"])
    result = _run(
        installed,
        sys.executable,
        "-m",
        "ekd_ddnn.train",
        "trainer.max_epochs=1",
        "data.batch_size=64",
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = list(installed["cwd"].glob("logs/train/runs/*/results.json"))
    assert len(runs) == 1, list(installed["cwd"].rglob("*"))
    assert _tree(installed["site"]) == before
