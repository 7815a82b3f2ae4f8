"""Trust: nothing read from a file runs code, no checkpoint is lost on any filesystem, one
run per directory, resume trains what the run trained, a diverged run is never a result."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ekd_ddnn.errors import UserError
from ekd_ddnn.export import export_depth
from ekd_ddnn.models import build_net
from ekd_ddnn.run.checkpoint import data_config, load_checkpoint
from ekd_ddnn.train import train
from tests.conftest import compose_config, mounted_tmpfs, run_cli

RUN = ["data=synthetic", "data.image_size=16", "data.num_train=128", "trainer.deterministic=true"]


class RunsCode:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_running_data_configs(marker: Path) -> dict[str, dict]:
    """Data configs that run code or write files when instantiated (weights-only loadable)."""
    payload = pickle.dumps(RunsCode(marker))
    return {
        "torch.load": {
            "_target_": "torch.load",
            "f": {"_target_": "io.BytesIO", "_args_": [payload]},
            "weights_only": False,
        },
        "write_text": {
            "_target_": "pathlib.Path.write_text",
            "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
            "data": "x",
        },
        "nested in ours": {
            "_target_": "ekd_ddnn.data.SyntheticDataModule",
            "num_train": {"_target_": "os.system", "_args_": [f"touch {marker}"]},
        },
    }


def craft_checkpoint(source: Path, target: Path, data: dict) -> Path:
    """``source`` with its stored data config replaced by ``data``."""
    ckpt = torch.load(source, weights_only=True)
    ckpt["hyper_parameters"]["config"]["data"] = data
    torch.save(ckpt, target)
    return target


@pytest.mark.parametrize("kind", ["torch.load", "write_text", "nested in ours"])
def test_checkpoint_data_config_never_instantiated(kind, digits_run, tmp_path):
    """A stored data config naming anything but one of our data modules is refused."""
    marker = tmp_path / "marker"
    data = code_running_data_configs(marker)[kind]
    crafted = craft_checkpoint(digits_run / "checkpoints" / "best.ckpt", tmp_path / "x.ckpt", data)
    ckpt = load_checkpoint(crafted)  # weights-only accepts it: it holds plain types only
    with pytest.raises(UserError, match="the checkpoint names an unknown data class"):
        data_config(ckpt)
    assert not marker.exists()
    own = load_checkpoint(digits_run / "checkpoints" / "best.ckpt")
    assert data_config(own)["_target_"] == "ekd_ddnn.data.DigitsDataModule"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_code_running_checkpoint_through_the_cli(command, digits_run, tmp_path):
    """evaluate and export (with recalibrate_bn) refuse it in one line; no marker file."""
    marker = tmp_path / "marker"
    data = code_running_data_configs(marker)["torch.load"]
    crafted = craft_checkpoint(digits_run / "checkpoints" / "best.ckpt", tmp_path / "x.ckpt", data)
    args = [f"ckpt_path={crafted}", f"hydra.run.dir={tmp_path / 'run'}"]
    if command == "export":
        args = [f"ckpt_path={crafted}", "depth=resnet8", f"out={tmp_path}/x.pt", "recalibrate_bn=8"]
    result = run_cli(command, *args, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: the checkpoint names an unknown data class (torch.load, io.BytesIO); pass "
        "data=<name> (digits, cifar10, cifar100, imagenet, synthetic) and data.data_dir=..."
    )
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


def test_export_temporary_file_never_follows_a_link(tmp_path):
    """A link planted where a predictable temporary file would be is neither followed nor
    removed; the export lands in ``out`` only."""
    net = build_net("cifar_resnet20", subnets=[[1, 1, 1]], num_classes=10, image_size=16)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = tmp_path / ".x.pt.tmp"
    planted.symlink_to(victim)
    export_depth(net, [1, 1, 1], tmp_path / "x.pt")
    assert victim.read_text() == "keep me" and planted.is_symlink()
    state = torch.load(tmp_path / "x.pt", weights_only=True)
    assert state.keys() == net.extract([1, 1, 1]).state_dict().keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.pt.tmp", "victim.txt", "x.pt"]


@pytest.mark.slow
def test_kill_during_save_on_another_filesystem_then_resume(tmp_path):
    """Run directory on a tmpfs (another filesystem than $TMPDIR): SIGKILL half-way through
    the epoch-2 checkpoint write keeps epoch 1's last.ckpt whole, and resume finishes."""
    with mounted_tmpfs(tmp_path / "scratch") as scratch:
        run_dir = scratch / "run"
        kill = ["+callbacks.kill._target_=tests.helpers.KillDuringSave", "+callbacks.kill.epoch=2"]
        result = run_cli("train", *RUN, "trainer.max_epochs=4", *kill, f"hydra.run.dir={run_dir}")
        assert result.returncode == -9
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
        assert (run_dir / ".lock").exists()  # left by the killed run; taken over below
        # resume reuses the run's overrides; the killer is removed
        result = run_cli("train", f"resume={run_dir}", "~callbacks.kill", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 3
        assert json.loads((run_dir / "results.json").read_text())[0]["name"] == "resnet20"
        assert not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_full_filesystem_keeps_previous_checkpoints(tmp_path):
    """A filesystem that fills up before epoch 2's save: one line, exit 1, the earlier
    checkpoints intact, no temporary file, no interrupted.ckpt, no results."""
    with mounted_tmpfs(tmp_path / "small", size="32m") as small:
        run_dir = small / "run"
        fill = [
            "+callbacks.fill._target_=tests.helpers.FillDiskAtEpochStart",
            "+callbacks.fill.epoch=2",
        ]
        result = run_cli("train", *RUN, "trainer.max_epochs=4", *fill, f"hydra.run.dir={run_dir}")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
            f"error: no space left on {run_dir / 'checkpoints'} while writing best.ckpt; the "
            "previous files are kept: free space there or write to another filesystem "
            "(hydra.run.dir=..., out=...)"
        ]
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert checkpoints == ["best.ckpt", "last.ckpt"]
        assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 1
        assert load_checkpoint(run_dir / "checkpoints" / "best.ckpt")["epoch"] <= 1
        assert not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_two_runs_in_one_directory(tmp_path):
    """While a run holds its directory, a second run there is refused naming the holder's
    pid; the first finishes undisturbed."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "ekd_ddnn.train", *RUN, "trainer.max_epochs=30",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / ".lock").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = run_cli("train", *RUN, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
        assert second.returncode == 1
        assert second.stderr.splitlines()[-1] == (
            f"error: run directory {run_dir} is in use by another run (pid {first.pid}); wait "
            "for it to end or choose another hydra.run.dir (delete "
            f"{run_dir / '.lock'} if that run is dead)"
        )
    finally:
        first.terminate()
        first.wait(timeout=120)
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.max_epochs=30" in overrides  # the record is the first run's


@pytest.mark.slow
def test_resume_refuses_changed_training_and_records_allowed_changes(tmp_path):
    """resume= with settings that change what is trained: one line listing them, nothing
    written; with allowed ones (more epochs): the run continues, recorded beside the
    original record, which stays as it was; resumed again, it keeps those settings."""
    run_dir = tmp_path / "run"
    first = run_cli("train", *RUN, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    log = (run_dir / "train.log").read_text()

    refused = run_cli("train", f"resume={run_dir}", "ekd=ddnn", "optimizer.lr=0.5", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        f"error: resume={run_dir} would change what the run trains: ekd.a 100.0 -> 0.0; "
        "ekd.mode ekd -> ddnn; ekd.w 1.0 -> 0.0; optimizer.lr 0.05 -> 0.5; resume without "
        "those overrides, or start a new run"
    )
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record

    resumed = run_cli("train", f"resume={run_dir}", "trainer.max_epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    changed = [line for line in resumed.stdout.splitlines() if line.startswith("resuming with")]
    assert len(changed) == 1 and "; trainer.max_epochs 1 -> 2" in changed[0]
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").glob("*.yaml")} == record
    again = (run_dir / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert again.splitlines() == [
        *[f"- {o}" for o in RUN],
        f"- resume={run_dir}",
        "- trainer.max_epochs=2",
    ]
    assert (run_dir / "train.log").read_text().startswith(log)  # appended, not replaced

    # resumed once more with nothing left to train and nothing to evaluate (test=false): the
    # last resumption's max_epochs=2 holds, the results stay and no record is added
    results = (run_dir / "results.json").read_bytes()
    ended = run_cli("train", f"resume={run_dir}", "test=false", cwd=tmp_path)
    assert ended.returncode == 1
    assert ended.stderr.splitlines()[-1] == FINISHED.format(key="max_epochs", value=2)
    assert (run_dir / "results.json").read_bytes() == results
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir() if p.is_dir()) == ["resume-1"]


FINISHED = (
    "error: the checkpoint had already reached trainer.{key}={value}: nothing was trained or "
    "measured and results.json, if any, is unchanged; raise trainer.{key} to train on, or "
    "pass test=true to evaluate the best checkpoint"
)


@pytest.mark.slow
def test_a_finished_run_resumed_with_validation_every_other_epoch_trains_nothing(tmp_path):
    """A run validated every other epoch saves ``last.ckpt`` after validation, so resuming
    it after its last epoch restarts that epoch with no batch left (Lightning still ends the
    epoch): counted by steps, nothing was trained, and with test=false the command is refused
    and results.json kept; max_steps reached is named as the limit."""
    run_dir = tmp_path / "run"
    every_other = "trainer.check_val_every_n_epoch=2"
    first = run_cli("train", *RUN, "trainer.max_epochs=2", every_other, f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    results = (run_dir / "results.json").read_bytes()
    ended = run_cli("train", f"resume={run_dir}", "test=false", cwd=tmp_path)
    assert ended.returncode == 1
    assert ended.stderr.splitlines()[-1] == FINISHED.format(key="max_epochs", value=2)
    steps = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    capped = run_cli(
        "train", f"resume={run_dir}", "test=false", f"trainer.max_steps={steps}", cwd=tmp_path
    )
    assert capped.returncode == 1
    assert capped.stderr.splitlines()[-1] == FINISHED.format(key="max_steps", value=steps)
    assert (run_dir / "results.json").read_bytes() == results


@pytest.mark.slow
def test_a_refusal_takes_back_only_the_record_of_a_command_that_wrote_nothing(tmp_path):
    """A resumption refused before it wrote anything takes its record (``resume-<n>``)
    back; one refused after it wrote a checkpoint keeps it, as does the original run."""
    run_dir = tmp_path / "run"
    first = run_cli("train", *RUN, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    refuse = "+callbacks.refuse._target_=tests.helpers.RefuseAtEpochStart"
    for epoch in (1, 2):  # 1: refused as it resumes; 2: after training epoch 1
        resumed = run_cli(
            "train", f"resume={run_dir}", "trainer.max_epochs=3", refuse,
            f"+callbacks.refuse.epoch={epoch}", cwd=tmp_path,
        )  # fmt: skip
        assert resumed.returncode == 1
        assert resumed.stderr.splitlines()[-1] == f"error: refused at epoch {epoch}"
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 1
    records = sorted(p.name for p in (run_dir / ".hydra").iterdir() if p.is_dir())
    assert records == ["resume-1"]  # the second resumption's, written before its refusal
    config = (run_dir / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert "+callbacks.refuse.epoch=2" in config
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
    """A NaN loss in epoch 1: exit 1 with one line naming the step, epoch 0's checkpoints
    kept (finite), no interrupted.ckpt, no results."""
    run_dir = tmp_path / "run"
    poison = [
        "+callbacks.poison._target_=tests.helpers.PoisonWeightsAtEpochStart",
        "+callbacks.poison.epoch=1",
    ]
    result = run_cli("train", *RUN, "trainer.max_epochs=3", *poison, f"hydra.run.dir={run_dir}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    steps_per_epoch = 128 // 32  # synthetic: 128 training images, batch 32
    assert result.stderr.splitlines()[-1].startswith(
        f"error: training diverged: the loss became NaN or infinite at step {steps_per_epoch} "
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0
    weights = [v for v in last["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)
    assert not (run_dir / "results.json").exists()


def test_max_epochs_unbounded_with_max_steps(tmp_path):
    """trainer.max_epochs=-1 with trainer.max_steps (valid in Lightning) trains that many
    steps, its schedule sized by the steps."""
    cfg = compose_config(
        "train", [*RUN, "trainer.max_epochs=-1", "trainer.max_steps=5", "test=false"], tmp_path
    )
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 5
    # cosine over exactly 5 steps: the learning rate has reached its final value, 0
    assert objects["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_train_log_holds_lightning_and_our_lines(tmp_path):
    """The run's train.log has Lightning's messages, warnings and our results lines."""
    run_dir = tmp_path / "run"
    result = run_cli("train", *RUN, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    log = (run_dir / "train.log").read_text()
    assert "[lightning.pytorch" in log and "`Trainer.fit` stopped: `max_epochs=1` reached." in log
    assert f"results: {run_dir / 'results.json'}" in log and "| resnet20 | [3,3,3] |" in log


@pytest.mark.slow
def test_evaluate_at_another_image_size_reports_its_macs(digits_run, tmp_path):
    """Evaluating at another data.image_size: MACs of that size, and the size in each row."""
    ckpt = digits_run / "checkpoints" / "best.ckpt"
    args = [f"ckpt_path={ckpt}", "data=synthetic", "data.in_channels=1", "speed.enabled=false"]
    runs = {}
    for size in (16, 32):
        out = tmp_path / str(size)
        result = run_cli("evaluate", *args, f"data.image_size={size}", f"hydra.run.dir={out}")
        assert result.returncode == 0, result.stderr
        runs[size] = json.loads((out / "results.json").read_text())
    net = build_net("cifar_resnet20", num_classes=10, in_channels=1, image_size=32)
    from ekd_ddnn.models import count_macs

    for size in (16, 32):
        assert runs[size][0]["macs"] == count_macs(net.extract([3, 3, 3]), (1, size, size))
    assert runs[32][0]["macs"] > 3.9 * runs[16][0]["macs"]  # convolutions: 4x the pixels
    assert runs[32][0]["image_size"] == 32 and "image_size" not in runs[16][0]


def test_unreadable_checkpoint_says_permission_denied(digits_run, tmp_path):
    """A checkpoint the user may not read: 'permission denied', not 'corrupt' (as root the
    check runs in a child process as user nobody)."""
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    ckpt = folder / "locked.ckpt"
    ckpt.write_bytes((digits_run / "checkpoints" / "best.ckpt").read_bytes())
    ckpt.chmod(0)
    code = (  # imports first: the interpreter's own files may not be readable by nobody
        "import os, sys\n"
        "from ekd_ddnn.run.checkpoint import load_checkpoint\n"
        "from ekd_ddnn.errors import UserError\n"
        "if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)\n"
        "try: load_checkpoint(sys.argv[1])\n"
        "except UserError as e: print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True)
    assert result.stdout.strip() == (
        f"cannot read checkpoint {ckpt}: permission denied; check the file's permissions"
    ), result.stderr
