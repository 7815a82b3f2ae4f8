"""Scaling out: DDP on 2 CPU processes (gloo), W&B offline runs, sweeps and their aggregate,
the Optuna and SLURM configs, and the Hydra x DDP traps."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ekd_ddnn.errors import UserError
from ekd_ddnn.results import read_overrides, read_results
from ekd_ddnn.run.launch import hydra_job_rank_command
from tests.conftest import compose_config, run_cli

TINY = [
    "data=synthetic",
    "data.image_size=16",
    "data.num_val=65",  # odd: a padding sampler would count a sample twice on 2 ranks
    "data.num_test=67",
    "trainer.max_epochs=1",
]


def _errors(run_dir: Path) -> dict[str, tuple[float, float]]:
    rows = json.loads((run_dir / "results.json").read_text())
    return {r["name"]: (r["top1_err"], r["top5_err"]) for r in rows}


@pytest.mark.slow
def test_ddp_evaluation_equals_single_process(tmp_path):
    """evaluate with trainer=ddp on 2 CPU processes == 1 process, per depth, exactly."""
    train = run_cli("train", *TINY, f"hydra.run.dir={tmp_path / 'train'}")
    assert train.returncode == 0, train.stderr
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"eval{devices}"
        result = run_cli(
            "evaluate",
            f"ckpt_path={ckpt}",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            f"trainer.devices={devices}",
            "speed.enabled=false",
            f"hydra.run.dir={out}",
        )
        assert result.returncode == 0, result.stderr
        runs[devices] = _errors(out)
    assert runs[1] == runs[2]
    assert len(runs[1]) == 3


@pytest.mark.slow
def test_ddp_on_device_ranks_take_disjoint_shards(tmp_path):
    """data.on_device=true on 2 DDP processes: each rank takes its own half of every epoch's
    order (no image twice, none left out but the remainder), the order differs by epoch,
    and the run finishes with its results."""
    result = run_cli(
        "train",
        *TINY,
        "data.on_device=true",
        "data.num_train=130",  # 65 per rank: two steps of 32 each
        "data.batch_size=32",
        "trainer.max_epochs=2",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "+callbacks.shard._target_=tests.helpers.RecordShard",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    shards = [
        [list(map(int, line.split())) for line in (tmp_path / f"shard_rank{r}.txt").open()]
        for r in (0, 1)
    ]
    for epoch in (0, 1):
        first, second = shards[0][epoch], shards[1][epoch]
        assert len(first) == len(second) == 65
        assert not set(first) & set(second)
        assert set(first) | set(second) <= set(range(130))
    assert shards[0][0] != shards[0][1]
    assert (tmp_path / "results.json").is_file()


@pytest.mark.slow
def test_ddp_training_uses_one_run_directory(tmp_path):
    """Training on 2 ranks writes one run directory: rank 1 neither makes its own nor
    writes a config; results and checkpoints come from rank 0."""
    run_dir = tmp_path / "logs" / "run"
    result = run_cli(
        "train",
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["run"]
    assert (run_dir / "results.json").is_file() and (
        run_dir / "checkpoints" / "last.ckpt"
    ).is_file()
    assert (run_dir / "train_rank1.log").is_file()  # rank 1 ran the same job, same directory
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_multirun_ddp_runs_each_job_once(tmp_path):
    """A 2-job sweep with 2 DDP ranks per job: 2 job directories, no nested sweeps."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train",
        "-m",
        *TINY,
        "ekd.w=0,1",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, w in (("0", 0), ("1", 1)):
        config = json.dumps((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert f"ekd.w={w}" in config
        assert (sweep / job / "results.json").is_file()
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "logs").exists()


def test_rank_command_is_the_job_not_the_sweep(tmp_path):
    """Ranks 1..N-1 start with this job's resolved values (e.g. Optuna's sampled ekd.w) and
    its run directory, as a single run: never the sweep again."""
    cfg = compose_config(
        "train", ["hparams_search=ekd_optuna", "ekd.w=0.37", "ekd.a=12.5"], tmp_path
    )
    command, _ = hydra_job_rank_command(1)
    assert "ekd.w=0.37" in command and "ekd.a=12.5" in command
    args = command[3:]  # after `python -m <module>`
    assert "-m" not in args and "--multirun" not in args
    assert "hydra.mode=RUN" in command
    assert f'hydra.run.dir="{tmp_path}"' in command and "hydra.output_subdir=null" in command
    assert f"hydra.job.name={cfg.hydra.job.name}_rank1" in command


def _wandb_records(run_file: Path):
    """Records of an offline W&B run file (LevelDB-log framing of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, pending = run_file.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if pos + 7 + length > len(raw):  # a record W&B is still writing
            break
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
def test_wandb_offline_run_holds_every_net_and_the_table(compose_train, tmp_path, monkeypatch):
    """An offline W&B run records each depth's metrics and the per-depth results table."""
    from ekd_ddnn.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose_train(*TINY, "logger=wandb"))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run_file = next(run_dir.glob("run-*.wandb"))
    for _ in range(120):  # W&B's service may still be writing after finish() returns
        records = list(_wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    keys = set()
    for record in records:
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    for name in ("resnet20", "resnet14", "resnet8"):
        for key in ("val/top1_err", "val/top5", "test/top1_err", "train/ce", "train/kl"):
            assert f"{key}/{name}" in keys
    assert "trainer/global_step" in keys and "results/table/nrows" in keys
    (table_file,) = run_dir.glob("files/media/table/results/table_*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[0] for row in table["data"]] == ["resnet20", "resnet14", "resnet8"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row[4] for row in table["data"]] == [r["top1_err"] for r in results]


@pytest.mark.slow
def test_multirun_and_aggregate(tmp_path):
    """A 2x2 sweep: 4 job directories, each its own W&B run; the aggregate has 4 rows with
    every depth's error and a heatmap."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train",
        "-m",
        *TINY,
        "ekd.w=0,1",
        "ekd.a=0,10",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    run_ids = {next((sweep / j / "wandb").glob("offline-run-*")).name for j in jobs}
    assert len(run_ids) == 4  # one W&B run per job
    result = run_cli("aggregate", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((sweep / "aggregate.json").read_text())
    assert len(rows) == 4
    assert {(r["ekd.w"], r["ekd.a"]) for r in rows} == {
        ("0", "0"),
        ("0", "10"),
        ("1", "0"),
        ("1", "10"),
    }
    for row in rows:
        expected = _errors(sweep / row["job"])
        for name, (top1, _) in expected.items():
            assert row[f"top1_err/{name}"] == top1
    assert (sweep / "aggregate_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "| job | ekd.a | ekd.w |" in result.stdout


def test_aggregate_errors(tmp_path):
    """A directory without finished jobs is a one-line error."""
    result = run_cli("aggregate", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds no finished jobs (no */results.json)" in result.stderr


ROWS = [
    {"name": "resnet20", "blocks": [3, 3, 3], "params": 1, "macs": 2, "top1_err": 12.5,
     "top5_err": 1.0, "split": "val"},
    {"name": "resnet8", "blocks": [1, 1, 1], "params": 1, "macs": 1, "top1_err": None,
     "top5_err": None, "split": "val"},
]  # fmt: skip


def _fake_multirun(root: Path, values: list[str]) -> Path:
    """A multirun directory as ``train -m ekd.w=...`` leaves it: one folder per job with
    ``.hydra/overrides.yaml`` and ``results.json``, without training."""
    for num, value in enumerate(values):
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- data=synthetic\n- ekd.w={value}\n")
        rows = [{**r, "top1_err": r["top1_err"] and r["top1_err"] + num} for r in ROWS]
        (job / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return root


def test_aggregate_fake_multirun(tmp_path):
    """The aggregate of a fake sweep: one row per job, the swept key only."""
    sweep = _fake_multirun(tmp_path / "sweep", ["0", "1"])
    result = run_cli("aggregate", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((sweep / "aggregate.json").read_text())
    assert [(r["job"], r["ekd.w"], r["top1_err/resnet20"]) for r in rows] == [
        ("0", "0", 12.5),
        ("1", "1", 13.5),
    ]
    assert "data" not in rows[0] and rows[0]["top1_err/subnets_mean"] is None


def test_aggregate_truncated_job(tmp_path):
    """A job whose results.json was cut off mid-write: one line naming that job, no files."""
    sweep = _fake_multirun(tmp_path / "sweep", ["0", "1", "2"])
    path = sweep / "1" / "results.json"
    path.write_text(path.read_text()[:40])
    result = run_cli("aggregate", str(sweep), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: job {sweep / '1'}: results.json is not a finished results table "
        "(Unterminated string starting at: line 4 column 5 (char 34)); rerun that job or move "
        "its folder away"
    ]
    assert not (sweep / "aggregate.json").exists()


def test_aggregate_malformed_overrides(tmp_path):
    """A job whose .hydra/overrides.yaml does not parse: one line naming that job."""
    sweep = _fake_multirun(tmp_path / "sweep", ["0", "1"])
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("[ekd.w=0, data")
    result = run_cli("aggregate", str(sweep), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: job {sweep / '0'}: .hydra/overrides.yaml is not a list of overrides (expected "
        "',' or ']', but got '<stream end>' at line 1, column 15); rerun that job or move its "
        "folder away"
    ]


def test_read_results_valid(tmp_path):
    """A results table reads back as written; extra keys are kept."""
    (tmp_path / "results.json").write_text(json.dumps(ROWS))
    assert read_results(tmp_path / "results.json") == ROWS


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (json.dumps(ROWS, indent=2)[:40], "Unterminated string starting at: line 4 column 5 "
         "(char 34)"),
        ('[{"name": "r20"}\n{"name": "r8"}]', "Expecting ',' delimiter: line 2 column 1 (char 17)"),
        ("", "Expecting value: line 1 column 1 (char 0)"),
        ("{}", "an object, not a list of rows"),
        ("[]", "an empty list, no rows"),
        ("[1]", "row 1 is a number, not an object"),
        (json.dumps([ROWS[0], {"blocks": [1]}]), "row 2 has no 'name'"),
        (json.dumps([{**ROWS[0], "name": 20}]), "row 1: 'name' must be a string, got 20"),
        (json.dumps([{**ROWS[0], "blocks": "3-3-3"}]),
         "row 1: 'blocks' must be a list of integers, got \"3-3-3\""),
        (json.dumps([{**ROWS[0], "blocks": [3, 3.5]}]),
         "row 1: 'blocks' must be a list of integers, got [3, 3.5]"),
        (json.dumps([{**ROWS[0], "top1_err": "12"}]),
         "row 1: 'top1_err' must be a number or null, got \"12\""),
        (json.dumps([{**ROWS[0], "top1_err": True}]),
         "row 1: 'top1_err' must be a number or null, got true"),
        (json.dumps([{k: v for k, v in ROWS[0].items() if k != "split"}]), "row 1 has no 'split'"),
        (json.dumps([{**ROWS[0], "split": None}]), "row 1: 'split' must be a string, got null"),
    ],
)  # fmt: skip
def test_read_results_invalid(tmp_path, text, reason):
    """Anything but a results table: one line naming the job folder and what is wrong."""
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(UserError) as info:
        read_results(tmp_path / "results.json")
    assert str(info.value) == (
        f"job {tmp_path}: results.json is not a finished results table ({reason}); rerun that "
        "job or move its folder away"
    )


def test_read_results_missing(tmp_path):
    """An unreadable (here: missing) file is the same one line."""
    with pytest.raises(UserError, match=r"\(cannot read it: No such file or directory\)"):
        read_results(tmp_path / "results.json")


def test_reading_results_loads_neither_torch_nor_hydra():
    """``ekd_ddnn.results`` (read_results, read_overrides: finished runs read back) imports
    without torch, Lightning or Hydra: the records' naming it shares with the run directory
    lives in ``run.records``, not in ``run.rundir``, which loads torch."""
    heavy = "{'torch', 'lightning', 'hydra'}"
    code = f"import sys, ekd_ddnn.results; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, []),
        ("[]\n", []),
        ("- ekd.w=0\n- seed=1\n", ["ekd.w=0", "seed=1"]),
        ("ekd.w: 0\n", "an object, not a list of key=value strings"),
        ("- ekd.w=0\n- 3\n", "item 2 is a number, not a string"),
        ("- ekd.w=0\n- 'seed=1", "found unexpected end of stream at line 2, column 10"),
    ],
)  # fmt: skip
def test_read_overrides(tmp_path, text, expected):
    """A job's recorded overrides: [] where none; a malformed file is one line naming it."""
    if text is not None:
        (tmp_path / ".hydra").mkdir()
        (tmp_path / ".hydra" / "overrides.yaml").write_text(text)
    if isinstance(expected, list):
        assert read_overrides(tmp_path) == expected
        return
    with pytest.raises(UserError) as info:
        read_overrides(tmp_path)
    assert str(info.value) == (
        f"job {tmp_path}: .hydra/overrides.yaml is not a list of overrides ({expected}); rerun "
        "that job or move its folder away"
    )


def test_read_overrides_takes_the_latest_resumption(tmp_path):
    """A resumed run's overrides are those of its last resumption (numbered, not sorted as
    text), without the ``resume=`` that started it; a folder without a record is skipped, and
    so is one whose number is not ours (ASCII digits): "²" once made ``int()`` raise."""
    record = tmp_path / ".hydra"
    for folder, items in [
        (record, ["seed=1", "trainer.max_epochs=2"]),
        (record / "resume-2", ["seed=1", f"resume={tmp_path}", "trainer.max_epochs=3"]),
        (record / "resume-10", ["seed=1", f"++resume={tmp_path}", "trainer.max_epochs=5"]),
    ]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "overrides.yaml").write_text("".join(f"- {o}\n" for o in items))
    (record / "resume-11").mkdir()  # a resumption whose record was taken back
    for name in ("resume-²", "resume-٣٠", "resume-x", "resume-", "resume-+12"):  # not ours
        (record / name).mkdir()
        (record / name / "overrides.yaml").write_text("- seed=9\n")
    assert read_overrides(tmp_path) == ["seed=1", "trainer.max_epochs=5"]
    (record / "resume-10" / "overrides.yaml").write_text("seed: 1\n")
    with pytest.raises(UserError) as info:
        read_overrides(tmp_path)
    assert str(info.value) == (
        f"job {tmp_path}: .hydra/resume-10/overrides.yaml is not a list of overrides (an "
        "object, not a list of key=value strings); rerun that job or move its folder away"
    )


def test_optuna_and_slurm_configs_compose(tmp_path):
    """hparams_search=ekd_optuna and hydra/launcher=slurm compose with the real configs."""
    cfg = compose_config("train", ["hparams_search=ekd_optuna", "experiment=cifar10_r20"], tmp_path)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"ekd.w", "ekd.a"}
    assert cfg.optimized_metric == "val/top1_err/subnets_mean"
    cfg = compose_config(
        "train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8"], tmp_path
    )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 8 and cfg.hydra.launcher.gpus_per_node == 8
