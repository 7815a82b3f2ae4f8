"""Where a run's record lies: ``.hydra/`` of its first command, ``.hydra/resume-<n>/`` of each
resumption. Plain paths, no torch or Hydra: :mod:`ekd_ddnn.results` reads a finished run's overrides
through it and stays light (0.07 s to import, against 4 s through ``run.rundir``, which
loads torch for its checkpoint checks and writes the records).
"""

from __future__ import annotations

from pathlib import Path

RECORD = ".hydra"
RESUMED = "resume-"  # a resumption's record: .hydra/resume-<n>/


def resumptions(record: Path) -> list[tuple[int, Path]]:
    """The records of a run's resumptions in its ``record`` folder, ``(n, resume-<n>/)`` by
    ``n``: the latest is the last."""
    found = []
    for folder in record.glob(f"{RESUMED}*"):
        n = folder.name.removeprefix(RESUMED)
        if n.isascii() and n.isdecimal():  # ours: resume-1, ... (int() would take "٣")
            found.append((int(n), folder))
    return sorted(found)


def latest_record(run_dir: str | Path) -> Path:
    """The record of the latest command of the run in ``run_dir``: ``.hydra/resume-<n>/`` of
    its last resumption (which holds every override that command ran with), else
    ``.hydra/``."""
    record = Path(run_dir) / RECORD
    resumed = [f for _, f in resumptions(record) if (f / "overrides.yaml").is_file()]
    return resumed[-1] if resumed else record
