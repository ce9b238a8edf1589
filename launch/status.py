"""``python -m launch status RUN_DIR``: jobs and their states, progress, latest checkpoint."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from submitit.core.utils import JobPaths, pickle_load

from launch.jobs import RECORD, JobRecord, read_records
from launch.task import input_error_line
from train.api import RunDir


def run_markers(run_dir: Path) -> tuple[Path, ...]:
    """What a run directory holds once launched (the job record) or trained (the rest)."""
    run = RunDir(run_dir)
    return (run_dir / RECORD, run.config, run.checkpoints, run.tb)


@dataclass
class JobStatus:
    """One job of a run as seen now."""

    job_id: str
    executor: str
    state: str
    """SLURM's state from sacct where available; else read from the submitit folder."""
    log: Path
    """Rank 0's stdout log."""
    detail: str = ""


@dataclass
class RunStatus:
    """Everything ``status`` reports about one run directory."""

    run_dir: Path
    jobs: list[JobStatus] = field(default_factory=list)
    checkpoint: Path | None = None
    checkpoint_step: int | None = None
    logged_step: int | None = None
    """Last step written to TensorBoard (more recent than the checkpoint between saves)."""
    problems: list[str] = field(default_factory=list)


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, int | None, str | None]:
    """What ``checkpoints/latest`` names -> (folder, step, problem)."""
    try:
        ckpt = RunDir(run_dir).latest()
    except FileNotFoundError as e:
        return None, None, str(e)
    return (ckpt.path, ckpt.step, None) if ckpt is not None else (None, None, None)


def last_logged_step(run_dir: Path) -> int | None:
    """Largest step of any TensorBoard scalar under ``run_dir/tb`` (None without event files)."""
    tb = RunDir(run_dir).tb
    if not tb.is_dir() or not any(tb.rglob("events.out.tfevents.*")):
        return None
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0}).AddRunsFromDirectory(str(tb)).Reload()
    steps = [
        e.step for run, tags in mux.Runs().items() for tag in tags.get("scalars", []) for e in mux.Scalars(run, tag)
    ]
    return max(steps) if steps else None


def _state_from_files(rec: JobRecord, paths: JobPaths) -> tuple[str, str]:
    """Job state read from the submitit folder (no scheduler query)."""
    if paths.result_pickle.exists():
        try:
            outcome, value = pickle_load(paths.result_pickle)
        except Exception as e:  # a result written by another version, or truncated
            return "UNKNOWN", f"unreadable result {paths.result_pickle}: {e}"
        if outcome == "success":
            status = getattr(value, "status", None)
            step = getattr(value, "step", None)
            return "COMPLETED", f"trainer returned {status} at step {step}" if status else ""
        last = str(value).strip().splitlines()[-1:] or [""]
        return "FAILED", input_error_line(str(value)) or last[0]
    if rec.executor == "local" and rec.job_id.isdigit() and _pid_alive(int(rec.job_id)):
        return "RUNNING", ""
    if paths.stdout.exists():
        return "STARTED", "no result yet (running, requeued, or killed)"
    return "SUBMITTED", "no log yet"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_status(rec: JobRecord) -> JobStatus:
    """State of one recorded job: sacct for SLURM jobs when available, then the folder."""
    paths = JobPaths(rec.folder, job_id=rec.job_id, task_id=0)
    state, detail = _state_from_files(rec, paths)
    if rec.executor == "slurm" and shutil.which("sacct"):
        import submitit

        try:
            sacct = submitit.SlurmJob(folder=rec.folder, job_id=rec.job_id).get_info(mode="force").get("State")
        except Exception as e:  # sacct down or job purged from accounting: keep the folder's view
            detail = f"{detail}; sacct failed: {e}".strip("; ")
        else:
            if sacct:
                state = sacct
    return JobStatus(rec.job_id, rec.executor, state, paths.stdout, detail)


def run_status(run_dir: Path) -> RunStatus:
    """Collect the status of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    markers = run_markers(run_dir)
    if not any(m.exists() for m in markers):
        raise FileNotFoundError(f"{run_dir} is not a run directory (none of {', '.join(m.name for m in markers)} in it)")
    out = RunStatus(run_dir.resolve())
    records, out.problems = read_records(run_dir)
    out.jobs = [job_status(r) for r in records]
    out.checkpoint, out.checkpoint_step, problem = latest_checkpoint(run_dir)
    if problem:
        out.problems.append(problem)
    out.logged_step = last_logged_step(run_dir)
    return out


def format_status(st: RunStatus) -> str:
    """Human-readable report."""
    lines = [f"run: {st.run_dir}"]
    if not st.jobs:
        lines.append("jobs: none recorded (not launched through `python -m launch`?)")
    for j in st.jobs:
        lines.append(f"job {j.job_id} [{j.executor}] {j.state}" + (f" - {j.detail}" if j.detail else ""))
        lines.append(f"  log: {j.log}")
    if st.checkpoint is not None:
        lines.append(f"latest checkpoint: {st.checkpoint} (step {st.checkpoint_step})")
    else:
        lines.append("latest checkpoint: none")
    lines.append(f"last logged step: {st.logged_step if st.logged_step is not None else 'none'}")
    lines += [f"warning: {p}" for p in st.problems]
    return "\n".join(lines)
