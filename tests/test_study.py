"""The study command: every column and seed in one table, paired differences, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import UserError
from ekd_ddnn.study import check_parallel, check_seeds, plan, summarise
from tests.conftest import run_cli


def test_summarise_by_hand():
    """Means, sample stds and same-seed differences, computed by hand."""
    rows = [
        {"column": c, "seed": s, "name": n, "top1_err": e}
        for c, s, n, e in [
            ("ddnn", 0, "r20", 10.0), ("ddnn", 1, "r20", 14.0), ("ddnn", 0, "r14", 20.0),
            ("ekd", 0, "r20", 9.0), ("ekd", 1, "r20", 11.0), ("ekd", 0, "r14", 17.0),
            ("ekd", 1, "r14", 19.0),
        ]
    ]  # fmt: skip
    out = summarise(rows, ["r20", "r14"], ["ddnn", "ekd"], [["ekd", "ddnn"]])
    assert out["seeds"] == [0, 1]
    assert out["top1_err"]["r20"]["ddnn"] == {"mean": 12.0, "std": 8**0.5, "n": 2}
    assert out["top1_err"]["r14"]["ddnn"] == {"mean": 20.0, "std": None, "n": 1}
    # per seed: -1 and -3 -> mean -2, sample std sqrt(2); r14 only seed 0 is paired
    assert out["differences"]["ekd - ddnn"]["r20"] == {"mean": -2.0, "std": 2**0.5, "n": 2}
    assert out["differences"]["ekd - ddnn"]["r14"] == {"mean": -3.0, "std": None, "n": 1}


@pytest.mark.slow
def test_study_smoke_table_and_resume(tmp_path):
    """The smoke study trains every column and seed (individual: one job per depth), writes
    one table, and a second run trains nothing; an unfinished job resumes from its checkpoint,
    a job run with other settings is refused."""
    root = tmp_path / "study"
    args = ["study=smoke", "parallel=2", f"hydra.run.dir={root}"]
    result = run_cli("study", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "study smoke: 10 jobs, 0 finished" in result.stdout

    study = json.loads((root / "study.json").read_text())
    columns = ["individual", "ddnn", "ekd", "ekd_no_ensemble"]
    assert list(study["top1_err"]) == ["resnet20", "resnet8"]
    for name in ("resnet20", "resnet8"):
        assert list(study["top1_err"][name]) == columns
        assert all(cell["n"] == 2 for cell in study["top1_err"][name].values())
        for pair in ("ekd - ddnn", "ekd - individual", "ekd - ekd_no_ensemble"):
            assert study["differences"][pair][name]["n"] == 2
    assert len(study["rows"]) == 2 * (2 + 2 + 2 + 2)  # seeds x (2 individual jobs + 3 x 2 depths)
    individual = {(r["job"], r["name"]) for r in study["rows"] if r["column"] == "individual"}
    assert individual == {("individual-resnet20", "resnet20"), ("individual-resnet8", "resnet8")}
    for row in study["rows"]:  # every number comes from its job's own results.json
        job = json.loads((root / row["job"] / f"seed{row['seed']}" / "results.json").read_text())
        assert row["top1_err"] == next(r["top1_err"] for r in job if r["name"] == row["name"])
    table = (root / "study.md").read_text()
    assert "| net | individual | ddnn | ekd | ekd_no_ensemble |" in table
    assert "| net | ekd - ddnn | ekd - individual | ekd - ekd_no_ensemble |" in table

    # again: nothing to train, the same table
    logs = {p: p.stat().st_mtime_ns for p in root.glob("*/seed*/results.json")}
    result = run_cli("study", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "study smoke: 10 jobs, 10 finished" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/seed*/results.json")} == logs
    assert json.loads((root / "study.json").read_text()) == study

    # an interrupted job (checkpoint, no results) continues from its checkpoint
    (root / "ekd" / "seed1" / "results.json").unlink()
    result = run_cli("study", *args, "dry_run=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "10 jobs, 9 finished" in result.stdout
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .endswith(f"hydra.run.dir={root}/ekd/seed1 resume={root}/ekd/seed1")
    )
    # a finished job run with other settings is not mixed into the table
    result = run_cli("study", *args, "study.overrides.8='trainer.max_epochs=2'")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {root}/individual-resnet20/seed0 was run with other settings" in result.stderr
    assert "trainer.max_epochs=1 trainer.max_epochs=2" in result.stderr


def test_bad_seeds_fail_before_any_job(tmp_path):
    """study.seeds=[a] is one line (exit 1, no traceback) and no job folder is made."""
    root = tmp_path / "study"
    result = run_cli("study", "study=smoke", "study.seeds=[a]", f"hydra.run.dir={root}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: study.seeds must be a list of integers, e.g. study.seeds=[0,1,2]; got ['a']"
    ]
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ([], "study.seeds is empty; give at least one seed, e.g. study.seeds=[0,1,2]"),
        (3, "study.seeds must be a list of integers, e.g. study.seeds=[0,1,2]; got 3"),
        ("0", "study.seeds must be a list of integers, e.g. study.seeds=[0,1,2]; got '0'"),
        ([1.5], "study.seeds must be a list of integers, e.g. study.seeds=[0,1,2]; got [1.5]"),
        ([True], "study.seeds must be a list of integers, e.g. study.seeds=[0,1,2]; got [True]"),
        ([0, -1], "study.seeds must be between 0 and 4294967295 (the seeds Lightning accepts); "
         "got [0, -1]"),
        ([0, 1, 0], "study.seeds lists [0] more than once; give each seed once"),
    ],
)  # fmt: skip
def test_check_seeds(seeds, message):
    """Seeds are a non-empty list of distinct integers in Lightning's range."""
    with pytest.raises(UserError) as info:
        check_seeds(OmegaConf.create({"s": seeds}).s)
    assert str(info.value) == message


def test_check_seeds_and_parallel_accept():
    """Valid values pass through."""
    assert check_seeds(OmegaConf.create({"s": [0, 1, 2**32 - 1]}).s) == [0, 1, 2**32 - 1]
    assert check_parallel(3) == 3


@pytest.mark.parametrize("value", [0, -1, 1.5, "a", True, None])
def test_check_parallel(value):
    """parallel must be an integer >= 1."""
    with pytest.raises(UserError) as info:
        check_parallel(value)
    assert str(info.value) == (
        f"parallel must be an integer >= 1 (jobs run at the same time), got {value!r}"
    )


def test_bad_parallel_fails_before_any_job(tmp_path):
    """parallel=a is one line, even with dry_run=true."""
    root = tmp_path / "study"
    result = run_cli("study", "study=smoke", "parallel=a", "dry_run=true", f"hydra.run.dir={root}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: parallel must be an integer >= 1 (jobs run at the same time), got 'a'"
    ]


def test_truncated_finished_job_fails_the_plan(tmp_path):
    """A finished job whose results.json was cut off is named before anything trains."""
    study = OmegaConf.load(Path(CONFIG_DIR) / "study" / "smoke.yaml")
    jobs, _ = plan(study, tmp_path)
    jobs[0].out.mkdir(parents=True)
    (jobs[0].out / "results.json").write_text('[{"name": "resnet20", "blocks": [3')
    with pytest.raises(UserError) as info:
        plan(study, tmp_path)
    assert str(info.value) == (
        f"job {jobs[0].out}: results.json is not a finished results table (Expecting ',' "
        "delimiter: line 1 column 35 (char 34)); rerun that job or move its folder away"
    )


@pytest.mark.parametrize("name", ["cifar10_subset_r20", "cifar100_r56", "imagenet_r50"])
def test_every_study_config_plans(name, tmp_path):
    """Each shipped study composes into valid train configs: the individual column trains
    each depth of the pairing alone, the other columns all depths together."""
    from omegaconf import OmegaConf

    study = OmegaConf.load(Path(CONFIG_DIR) / "study" / f"{name}.yaml")
    jobs, names = plan(study, tmp_path)
    per_seed = len(names) + len(study.columns) - 1
    assert len(jobs) == per_seed * len(study.seeds)
    together = set(study.columns) - {"individual"}
    assert {"ddnn", "ekd", "ekd_no_ensemble"} <= together
    assert {j.name for j in jobs} == {f"individual-{n}" for n in names} | together
    assert all(job.out == tmp_path / job.name / f"seed{job.seed}" for job in jobs)
    extra, _ = plan(study, tmp_path, ["data.data_dir=/elsewhere"])
    for job, moved in zip(jobs, extra, strict=True):  # after the study's own overrides
        n = len(study.overrides)
        assert moved.overrides == [
            *job.overrides[:n],
            "data.data_dir=/elsewhere",
            *job.overrides[n:],
        ]
