"""Reliability: kill-and-resume, determinism, interrupted checkpoint writes, secrets, and the
catalogue of user mistakes (docs/errors.md) through the real command line."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

from ekd_ddnn.run.checkpoint import load_checkpoint
from ekd_ddnn.train import train
from tests.conftest import REPO, SHARED_CIFAR, compose_config, run_cli
from tests.test_data import (
    IMG_SIZES,
    RunsCode,
    cifar_batch,
    dump,
    write_cifar10,
    write_image_folder,
)
from tests.test_trust import code_running_data_configs, craft_checkpoint

RUN = [
    "data=synthetic",
    "data.image_size=16",
    "data.num_train=128",
    "trainer.max_epochs=4",
    "trainer.deterministic=true",
]


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("on_device", [False, True])
def test_kill_and_resume_equals_uninterrupted(tmp_path, on_device):
    """SIGKILL after the 2nd epoch's checkpoint, resume=<run dir>: the same per-depth results
    and the same final weights as the run left alone (also with data.on_device=true, whose
    epoch order comes from (seed, epoch))."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = [*RUN, f"data.on_device={str(on_device).lower()}"]
    assert run_cli("train", *run, f"hydra.run.dir={whole}").returncode == 0
    kill = ["+callbacks.kill._target_=tests.helpers.SignalAtEpochStart", "+callbacks.kill.epoch=2"]
    result = run_cli("train", *run, *kill, f"hydra.run.dir={killed}")
    assert result.returncode == -9  # SIGKILL: no handler ran
    assert not (killed / "results.json").exists()
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    result = run_cli("train", f"resume={killed}", "~callbacks.kill")  # its own overrides
    assert result.returncode == 0, result.stderr
    assert json.loads((killed / "results.json").read_text()) == json.loads(
        (whole / "results.json").read_text()
    )
    ours, reference = _state(killed), _state(whole)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    assert _logged_epochs(killed) == _logged_epochs(whole) == {0, 1, 2, 3, 4}  # CSV continues


def _logged_epochs(run_dir: Path) -> set[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return {int(float(row["epoch"])) for row in csv.DictReader(f) if row["epoch"]}


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tmp_path):
    """SIGTERM (SLURM's pre-emption notice) mid-run: checkpoints/interrupted.ckpt holds the
    state at that moment and loads safely."""
    term = [
        "+callbacks.term._target_=tests.helpers.SignalAtEpochStart",
        "+callbacks.term.epoch=1",
        f"+callbacks.term.signum={int(signal.SIGTERM)}",
    ]
    result = run_cli("train", *RUN, *term, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; continue with ckpt_path=" in result.stderr
    interrupted = load_checkpoint(tmp_path / "checkpoints" / "interrupted.ckpt")
    assert interrupted["epoch"] == 1 and "rng_state" in interrupted
    assert not (tmp_path / "results.json").exists()


def test_resume_latest_and_run_dir_guard(tmp_path):
    """resume=latest picks the newest run with a checkpoint; a new run never reuses a run dir."""
    logs = tmp_path / "logs" / "train" / "runs"
    for name in ("2026-01-01_00-00-00", "2026-01-02_00-00-00", "2026-01-03_00-00-00"):
        (logs / name).mkdir(parents=True)
    for name in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        (logs / name / "checkpoints").mkdir()
        (logs / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    cfg = compose_config("train", ["resume=latest", f"paths.log_dir={tmp_path / 'logs'}"], tmp_path)
    assert cfg.hydra.run.dir == str(logs / "2026-01-02_00-00-00")
    old = logs / "2026-01-01_00-00-00"
    result = run_cli("train", f"hydra.run.dir={old}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: run directory {old} already holds a run; continue it with resume={old}, "
        "or choose another hydra.run.dir"
    )
    assert not (old / ".hydra").exists()  # nothing written into the old run


@pytest.mark.slow
def test_same_seed_same_results(tmp_path):
    """Two runs with the same seed and trainer.deterministic=true: identical results.json."""
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        train(compose_config("train", [*RUN, "trainer.max_epochs=2"], out))
        outputs.append((out / "results.json").read_text())
    assert outputs[0] == outputs[1]
    assert all(row["seed"] == 42 for row in json.loads(outputs[0]))


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    """A save that dies half-way (simulated) leaves the previous last.ckpt whole and loadable,
    and no temporary file behind."""
    cfg = compose_config("train", [*RUN, "trainer.max_epochs=1", "test=false"], tmp_path)
    _, objects = train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    written = []

    def dying_save(obj, f, *args, **kwargs):  # the process "dies" after half the bytes
        buffer = io.BytesIO()
        real_save(obj, buffer)
        written.append(buffer.tell())
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise KeyboardInterrupt("killed during the checkpoint write")

    real_save = torch.save
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        objects["trainer"].save_checkpoint(last)
    monkeypatch.undo()
    assert written and last.read_bytes() == before
    assert load_checkpoint(last)["epoch"] == 0
    assert sorted(p.name for p in last.parent.iterdir() if not p.name.startswith("best")) == [
        "last.ckpt"
    ]


@pytest.mark.slow
def test_wandb_api_key_never_written(tmp_path):
    """With WANDB_API_KEY set, no file of the run (config, logs, results, checkpoints, W&B
    files) contains the key."""
    key = "local-" + secrets.token_hex(20)
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        *RUN,
        "trainer.max_epochs=1",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        env={"WANDB_API_KEY": key},
    )
    assert result.returncode == 0, result.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".ckpt" for p in files)
    leaking = [p for p in files if key.encode() in p.read_bytes()]
    assert leaking == []
    assert key not in result.stdout + result.stderr


# ------------------------------------------------------------------ the bad-input catalogue
# (module, arguments, exit code, start of the one-line message); {ckpt}, {tmp}, {cifar} and
# {weights} are filled in per test. docs/errors.md lists every row with its message.
CATALOGUE = [
    (
        "train",
        ["experiment=nope"],
        1,
        "unknown experiment 'nope'; choose one of: cifar100_r20_r14, cifar100_r32_r20,",
    ),
    ("train", ["model=resnet51"], 1, "unknown model 'resnet51'; choose one of: cifar_resnet110,"),
    (
        "train",
        ["model.subnets=[[4,3,3]]"],
        1,
        "depth [4, 3, 3]: stage 1 has 4 blocks; each stage keeps between 1 and the full-net's count [1..3, 1..3, 1..3]",
    ),
    ("train", ["model.subnets=[[0,3,3]]"], 1, "depth [0, 3, 3]: stage 1 has 0 blocks"),
    (
        "train",
        ["model.subnets=[[3,3]]"],
        1,
        "depth [3, 3] has 2 stages but the full-net [3, 3, 3] has 3",
    ),
    ("train", ["model.subnets=[[2,2,2],[2,2,2]]"], 1, "sub-net [2, 2, 2] is listed twice"),
    ("train", ["model.subnets=[[3,3,3]]"], 1, "sub-net [3, 3, 3] is the full-net itself"),
    ("train", ["model.subnets=[[2,2"], 2, "cannot parse override 'model.subnets=[[2,2'"),
    ("train", ["ekd.w=-1"], 1, "ekd.w and ekd.a must be >= 0 (got w=-1, a=100.0)"),
    ("train", ["ekd.a=lots"], 1, "ekd.a must be a number, got 'lots'"),
    ("train", ["ekd.temperature=0"], 1, "ekd.temperature must be > 0, got 0"),
    (
        "train",
        ["data=cifar10", "data.data_dir={tmp}/nowhere"],
        1,
        "cifar10 not found in {tmp}/nowhere/cifar-10-batches-py (no such directory)",
    ),
    ("train", ["data.num_classes=5"], 1, "digits has num_classes=10 but data.num_classes=5"),
    (
        "train",
        ["data=synthetic", "model=resnet18", "model.weights_path={weights}"],
        1,
        "weights file {weights} has 1000 classes but the model has 10",
    ),
    (
        "train",
        ["trainer.accelerator=gpu"],
        1,
        "cannot set up the trainer: No supported gpu backend found!",
    ),
    ("train", ["resume={tmp}"], 1, "nothing to resume: {tmp}/checkpoints/last.ckpt does not exist"),
    ("evaluate", ["ckpt_path={tmp}/none.ckpt"], 1, "checkpoint {tmp}/none.ckpt does not exist"),
    ("evaluate", ["ckpt_path={truncated}"], 1, "checkpoint {truncated} is truncated or corrupt ("),
    ("evaluate", ["ckpt_path={weights}"], 1, "{weights} is not an ekd-ddnn training checkpoint"),
    ("evaluate", ["ckpt_path={ckpt}", "recalibrate_bn=-1"], 1, "recalibrate_bn must be >= 0"),
    (
        "export",
        ["ckpt_path={ckpt}", "depth=resnet8", "out={tmp}/x.pt", "recalibrate_bn=100000"],
        1,
        "recalibrate_bn=100000 but the training split yields only 1408 images per epoch",
    ),
    (
        "study",
        ["study=nope"],
        1,
        "unknown study 'nope'; choose one of: cifar100_r56, cifar10_subset_r20, cifar10_subset_r20_lattice, imagenet_r50, smoke",
    ),
    (
        "study",
        ["study=smoke", "study.differences=[[ekd,oracle]]"],
        1,
        "study.per_depth / study.differences name column(s) ['oracle'] that study.columns does",
    ),
    (
        "evaluate",
        ["ckpt_path={ckpt}", "data=cifar10", "data.data_dir={cifar}", "split=test"],
        1,
        "the data has no test split; use split=val (or split=auto)",
    ),
    (
        "evaluate",
        ["ckpt_path={ckpt}", "data=cifar10", "data.data_dir={cifar}"],
        1,
        "the checkpoint's network has in_channels=1 but the data has in_channels=3",
    ),
    (
        "export",
        ["ckpt_path={ckpt}", "depth=resnet18", "out={tmp}/x.pt"],
        1,
        "this net has no depth named 'resnet18'; its depths are resnet20 [3, 3, 3], resnet14 [2, 2, 2], resnet8 [1, 1, 1]",
    ),
    (
        "export",
        ["ckpt_path={ckpt}", "depth=[4,3,3]", "out={tmp}/x.pt"],
        1,
        "depth [4, 3, 3]: stage 1 has 4 blocks",
    ),
    (
        "export",
        ["ckpt_path={ckpt}", "depth=resnet8", "out={weights}"],
        1,
        "{weights} already exists; pass overwrite=true to replace it",
    ),
    (
        "export",
        ["ckpt_path={ckpt}", "depth=resnet8", "format=tflite", "out={tmp}/x"],
        1,
        "unknown format 'tflite'; choose one of state_dict, torchscript, onnx",
    ),
    (
        "summary",
        ["model=cifar_vgg16", "model.subnets=[[1,1,2,2,9]]"],
        1,
        "depth [1, 1, 2, 2, 9]: stage 5 has 9 blocks",
    ),
    ("aggregate", ["{tmp}"], 1, "{tmp} holds no finished jobs (no */results.json)"),
    # ---- issue 13: files that would run code, lost work, wrong results, tracebacks
    (
        "evaluate",
        ["ckpt_path={data_rce_ckpt}"],
        1,
        "the checkpoint names an unknown data class (torch.load, io.BytesIO); pass data=<name> (digits, cifar10, cifar100, imagenet, synthetic) and data.data_dir=...",
    ),
    (
        "export",
        ["ckpt_path={data_rce_ckpt}", "depth=resnet8", "out={tmp}/y.pt", "recalibrate_bn=8"],
        1,
        "the checkpoint names an unknown data class (torch.load, io.BytesIO)",
    ),
    (
        "train",
        ["experiment=cifar10_r20", "data.data_dir={evil_cifar}"],
        1,
        "cannot read cifar10 file {evil_cifar}/cifar-10-batches-py/data_batch_1: it holds a Python object (posix.system) that would run code on load; use the official python-version files",
    ),
    (
        "train",
        ["experiment=cifar10_r20", "data.data_dir={bad_meta_cifar}"],
        1,
        "cannot read cifar10 file {bad_meta_cifar}/cifar-10-batches-py/batches.meta: not a CIFAR meta file (unreadable pickle:",
    ),
    (
        "evaluate",
        ["ckpt_path={evil_ckpt}"],
        1,
        "checkpoint {evil_ckpt} was refused: it holds a Python object (posix.system) that would run code on load; only load checkpoints written by ekd-ddnn",
    ),
    (
        "train",
        ["ckpt_path={evil_ckpt}"],
        1,
        "checkpoint {evil_ckpt} was refused: it holds a Python object (posix.system) that would run code on load",
    ),
    ("train", ["ckpt_path={tmp}/none.ckpt"], 1, "checkpoint {tmp}/none.ckpt does not exist"),
    (
        "evaluate",
        ["ckpt_path={tmp}"],
        1,
        "checkpoint {tmp} is a directory; pass the file, e.g. {tmp}/checkpoints/last.ckpt",
    ),
    (
        "train",
        ["optimizer.lr=1e6"],
        1,
        "training diverged: the loss became NaN or infinite at step",
    ),
    ("train", ["ekd.w=nan"], 1, "ekd.w must be a finite number, got nan"),
    ("train", ["ekd.temperature=inf"], 1, "ekd.temperature must be a finite number, got inf"),
    ("train", ["optimizer.lr=-1"], 1, "optimizer.lr must be > 0, got -1"),
    (
        "train",
        ["optimizer.momentum=-1"],
        1,
        "optimizer: Invalid momentum value: -1; check optimizer.*",
    ),
    ("train", ["seed=abc"], 1, "seed must be an integer, got 'abc'"),
    ("train", ["data.batch_size=abc"], 1, "data.batch_size must be an integer, got 'abc'"),
    (
        "train",
        ["data.num_workers=-1"],
        1,
        "data.num_workers must be >= 0, got -1 (0 loads in the main process)",
    ),
    (
        "train",
        ["data=synthetic", "data.num_classes=1"],
        1,
        "data.num_classes must be >= 2 (a classifier needs two classes), got 1",
    ),
    ("train", ["model.subnets=[[2.5,2,2]]"], 1, "model.subnets[0][0] must be an integer, got 2.5"),
    (
        "train",
        ["trainer.max_epochs=0"],
        1,
        "trainer.max_epochs=0 trains nothing; give at least 1 (or -1 for no limit)",
    ),
    (
        "train",
        ["data.batch_size=2000"],
        1,
        "1437 training images make no batch of data.batch_size=2000: no training step; lower data.batch_size to at most 1437 or train on more images",
    ),
    (
        "train",
        ["data=synthetic", "data.num_train=0"],
        1,
        "data.num_train must be an integer >= 1, got 0",
    ),
    (
        "train",
        ["seed=-1"],
        1,
        "seed must be >= 0, got -1",
    ),
    (
        "train",
        ["trainer.float32_matmul_precision=HIGH"],
        1,
        "trainer.float32_matmul_precision must be one of highest, high, medium (torch.set_float32_matmul_precision), got 'HIGH'",
    ),
    (
        "train",
        ["+trainer.accumulate_grad_batches=0"],
        1,
        "trainer.accumulate_grad_batches must be >= 1, got 0",
    ),
    (
        "train",
        ["+trainer.limit_train_batches=0"],
        1,
        "trainer.limit_train_batches=0 trains nothing; give a count >= 1 or a fraction of the epoch in (0, 1]",
    ),
    (
        "train",
        ["+trainer.limit_train_batches=0.01"],
        1,
        "cannot train: You requested to check 0.01 of the `train_dataloader` but 0.01 * 22 < 1. Please increase the `limit_train_batches` argument.",
    ),
    (
        "train",
        ["data=synthetic", "data.image_size=2", "model=cifar_vgg11", "model.subnets=[[1,1,1,1,1]]"],
        1,
        "vgg11 cannot train on batches of 32 images of 2x2: Given input size: (128x1x1). Calculated output size: (128x0x0). Output size is too small; use larger images or batches (data.image_size, data.batch_size)",
    ),
    (
        "train",
        [
            "data=synthetic",
            "data.image_size=4",
            "model=resnet50",
            "model.subnets=[[1,1,1,1]]",
            "data.batch_size=1",
        ],
        1,
        "resnet50 cannot train on batches of 1 images of 4x4: Expected more than 1 value per channel when training, got input size torch.Size([1, 64, 1, 1]); use larger images or batches (data.image_size, data.batch_size)",
    ),
    (
        "train",
        ["trainer.max_epoch=1"],
        1,
        "unknown key trainer.max_epoch; did you mean trainer.max_epochs? (to add a new key on purpose: +trainer.max_epoch=...)",
    ),
    ("train", ["trainer.devices=64"], 1, "trainer.devices=64 starts 64 CPU processes on "),
    (
        "train",
        ["+trainer.sync_batchnorm=true", "model.bn_stats=private"],
        1,
        "trainer.sync_batchnorm=true replaces the BatchNorm layers that hold each depth's statistics (model.bn_stats=private) and drops them; use one of the two",
    ),
    (
        "train",
        ["callbacks.model_checkpoint.monitor=val/top1_err/man"],
        1,
        "ModelCheckpoint monitors 'val/top1_err/man', which this run never logs; did you mean val/top1_err/mean?",
    ),
    (
        "train",
        ["resume=latest"],
        1,
        "nothing to resume: no run in {cwd}/logs/train/runs has checkpoints/last.ckpt; start a new run without resume=",
    ),
    (
        "train",
        ["hydra.run.dir={file}/run"],
        1,
        "run directory {file}/run: {file} is a file, not a directory; choose another path",
    ),
    (
        "train",
        ["hydra.run.dir={readonly}/run"],
        1,
        "run directory {readonly}/run is not writable ({readonly} is read-only or not yours); choose another path",
    ),
    (
        "train",
        [
            "data=imagenet",
            "data.data_dir={bad_images}",
            "data.num_classes=3",
            "data.image_size=16",
            "data.batch_size=2",
            "data.num_workers=2",
            "model=cifar_resnet20",
        ],
        1,
        "cannot read image {bad_images}/train/cat/broken.png: ",
    ),
    (
        "train",
        ["data=imagenet", "data.on_device=true"],
        1,
        "data.on_device=true is supported for cifar10, cifar100, digits, synthetic, not for ImageNetDataModule; set data.on_device=false",
    ),
    ("evaluate", ["ckpt_path={ckpt}", "speed.repeats=0"], 1, "speed.repeats must be >= 1, got 0"),
    (
        "evaluate",
        ["ckpt_path={ckpt}", "speed.device=cuda"],
        1,
        "speed.device=cuda but no CUDA GPU is visible; use speed.device=cpu (or auto), or speed.enabled=false",
    ),
    (
        "export",
        ["ckpt_path={ckpt}", "depth=resnet8", "out={tmp}", "overwrite=true"],
        1,
        "out={tmp} is a directory; give a file path, e.g. out={tmp}/net.pt",
    ),
    (
        "export",
        ["ckpt_path={ckpt}", "depth=resnet8", "out={readonly}/x.pt"],
        1,
        "cannot write {readonly}/x.pt: {readonly} is read-only; choose another out=",
    ),
    (
        "aggregate",
        ["{truncated_sweep}"],
        1,
        "job {truncated_sweep}/1: results.json is not a finished results table (",
    ),
    # ---- issue 14: the lattice, its front, the depth for a budget
    (
        "train",
        ["ekd.sampling=sometimes"],
        1,
        "ekd.sampling must be fixed or lattice, got 'sometimes'",
    ),
    (
        "train",
        ["ekd.attention_stages=x"],
        1,
        "ekd.attention_stages must be all or differing, got 'x'",
    ),
    (
        "train",
        ["ekd.sampling=lattice", "ekd.num_sampled=30"],
        1,
        "ekd.num_sampled=30 but the depth lattice holds only 25 depths besides the full-net and the smallest; use at most 25",
    ),
    (
        "evaluate",
        ["ckpt_path={ckpt}", "depths=some"],
        1,
        "depths must be trained, lattice or a list such as [[3,2,3],[1,1,1]], got 'some'",
    ),
    (
        "select",
        ["ckpt_path={ckpt}"],
        1,
        "give a budget: budget.macs=<count>, budget.params=<count> or budget.latency_ms=<ms> (several must all hold)",
    ),
    (
        "select",
        ["ckpt_path={ckpt}", "budget.macs=1e3"],
        1,
        "no depth fits the budget (macs <= 0.001M): the cheapest is resnet8 [1, 1, 1] with macs 3.05M, params 0.0778M; raise the budget",
    ),
    (
        "study",
        ["study=smoke", "study.seeds=[a]"],
        1,
        "study.seeds must be a list of integers, e.g. study.seeds=[0,1,2]; got ['a']",
    ),
]


@pytest.fixture(scope="module")
def catalogue_files(digits_run, tmp_path_factory):
    """The files the catalogue's commands refer to; ``marker`` must never be created."""
    tmp = tmp_path_factory.mktemp("catalogue")
    marker = tmp / "code_ran"
    weights = tmp / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    best = digits_run / "checkpoints" / "best.ckpt"
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(best.read_bytes()[:5000])
    evil_ckpt = tmp / "evil.ckpt"
    torch.save({"state_dict": {}, "x": RunsCode(f"touch {marker}")}, evil_ckpt)
    data = code_running_data_configs(marker)["torch.load"]
    data_rce_ckpt = craft_checkpoint(best, tmp / "data_rce.ckpt", data)
    evil_cifar, bad_meta_cifar = tmp / "evil_cifar", tmp / "bad_meta_cifar"
    dump(write_cifar10(evil_cifar) / "data_batch_1", cifar_batch(data=RunsCode(f"touch {marker}")))
    (write_cifar10(bad_meta_cifar) / "batches.meta").write_bytes(b"\x80\x04garbage")
    bad_images = tmp / "bad_images"
    for split in ("train", "val"):
        write_image_folder(bad_images, split, ["ant", "bee", "cat"], IMG_SIZES[:2])
    (bad_images / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    file = tmp / "a_file"
    file.write_text("x")
    sweep = tmp / "sweep"
    for job, text in (("0", json.dumps(RESULTS_ROWS)), ("1", json.dumps(RESULTS_ROWS)[:40])):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- ekd.w={job}\n")
        (sweep / job / "results.json").write_text(text)
    with contextlib.ExitStack() as stack:
        readonly = stack.enter_context(read_only_folder(tmp / "readonly"))
        yield {
            "ckpt": best,
            "tmp": tmp,
            "weights": weights,
            "truncated": truncated,
            "cifar": SHARED_CIFAR,
            "evil_ckpt": evil_ckpt,
            "data_rce_ckpt": data_rce_ckpt,
            "evil_cifar": evil_cifar,
            "bad_meta_cifar": bad_meta_cifar,
            "bad_images": bad_images,
            "file": file,
            "readonly": readonly,
            "truncated_sweep": sweep,
            "marker": marker,
        }


RESULTS_ROWS = [{"name": "resnet20", "blocks": [3, 3, 3], "top1_err": 10.0, "split": "val"}]


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody may write into, root included: a read-only tmpfs where one can be
    mounted, else a mode-555 folder (read-only for everyone but root)."""
    path.mkdir()
    mounted = os.geteuid() == 0 and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        path.chmod(0o555)
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
        path.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize(("module", "args", "code", "message"), CATALOGUE)
def test_bad_input_catalogue(module, args, code, message, catalogue_files, tmp_path):
    """Each mistake: its exit code, exactly one 'error:' line on stderr, no traceback, and
    no run output (results, checkpoints), record (.hydra) or logger folder left."""
    joined = " ".join(args)
    if "{cifar}" in joined and not SHARED_CIFAR.is_dir():
        pytest.skip("../shared/data/cifar10-subset is not beside the repository")
    if "{readonly}" in joined and os.access(catalogue_files["readonly"], os.W_OK):
        pytest.skip("no read-only folder here: root, and no tmpfs can be mounted")
    if "speed.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    fill = lambda text: text.format(**catalogue_files, cwd=tmp_path)  # noqa: E731
    run_dir = tmp_path / "run"
    hydra_dir = [] if module in ("export", "summary", "aggregate") else [f"hydra.run.dir={run_dir}"]
    if any(a.startswith(("resume=", "hydra.run.dir=")) for a in args):
        hydra_dir = []
    result = run_cli(module, *[fill(a) for a in args], *hydra_dir, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: " + fill(message)), errors[0]
    assert not (run_dir / "results.json").exists() and not list(run_dir.glob("checkpoints/*"))
    # a record only of a run that ran (and diverged), none of one refused before it ran;
    # of a refused run only the command's log is left (no folder a logger made)
    assert (run_dir / ".hydra").exists() == message.startswith("training diverged")
    if not message.startswith("training diverged") and run_dir.exists():
        assert {p.name for p in run_dir.iterdir()} <= {f"{module}.log"}, list(run_dir.iterdir())
    assert not catalogue_files["marker"].exists()  # no code from a file ever ran


def test_catalogue_is_documented():
    """docs/errors.md lists every message of the catalogue (placeholders kept as written)."""
    doc = (REPO / "docs" / "errors.md").read_text()
    rows = re.findall(r"^\| `(.+?)` \| (\d) \| `error: (.+?)` \|$", doc, flags=re.M)
    documented = {cmd: (int(code), msg) for cmd, code, msg in rows}
    for module, args, code, message in CATALOGUE:
        command = f"python -m ekd_ddnn.{module} " + " ".join(args)
        assert command in documented, command
        assert documented[command][0] == code and documented[command][1].startswith(message)
    assert len(CATALOGUE) >= 15
