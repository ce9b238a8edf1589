"""The record of which jobs ran a run: ``<run_dir>/jobs.jsonl``, one line per submission.

A sweep's array members share one submitit folder, so the run directory alone
cannot say where its logs are; this record can. Requeues keep their job id and
folder, so they add no line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RECORD = "jobs.jsonl"


@dataclass(frozen=True)
class JobRecord:
    """One submission of a run."""

    job_id: str
    executor: str
    """``slurm`` or ``local``."""
    folder: str
    """The submitit folder of this job (logs, pickles), absolute."""
    submitted: float
    """Unix time of the submission."""


def add_record(run_dir: Path, job_id: str, executor: str, folder: Path) -> JobRecord:
    """Append a submission to the run's record (creating the run directory)."""
    rec = JobRecord(str(job_id), executor, str(Path(folder).absolute()), time.time())
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / RECORD).open("a") as f:
        f.write(json.dumps(asdict(rec)) + "\n")
    return rec


def read_records(run_dir: Path) -> tuple[list[JobRecord], list[str]]:
    """The run's submissions, oldest first, and a reason for each line that could not be read."""
    path = run_dir / RECORD
    if not path.is_file():
        return [], []
    records, problems = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(JobRecord(**json.loads(line)))
        except (ValueError, TypeError) as e:
            problems.append(f"{path}:{n}: unreadable job record ({e})")
    return records, problems
