"""Single-node multi-process runs through submitit's LocalExecutor.

Why LocalExecutor rather than torch.distributed.run: it runs the very same
:class:`~launch.task.TrainTask` as SLURM jobs, so local runs exercise the
rendezvous, preemption and requeue code that clusters use (its controller
restarts the tasks when rank 0 requests a requeue, and forwards SIGTERM and the
time-limit signal to every task); logs land in ``<run_dir>/local/<job id>_<task>_log.*`` and
``python -m launch status`` reads them like SLURM ones. torchrun remains the
tool for ``torchrun --nproc_per_node G -m train ...``; the trainer reads either.
"""

from __future__ import annotations

import os
from pathlib import Path

import submitit
from submitit.helpers import clean_env

from launch import preempt
from launch.jobs import add_record
from launch.slurm import parse_time_minutes
from launch.task import DEFAULT_TARGET, TrainTask
from train.api import Config

NO_LIMIT_MIN = 60 * 24 * 365
"""LocalExecutor always has a time limit (2 min by default); "none" means a year."""


def visible_gpus(nproc: int) -> tuple[int, ...]:
    """GPUs for ``nproc`` tasks: the first ``nproc`` of CUDA_VISIBLE_DEVICES (or 0..n-1); none on CPU."""
    import torch

    if not torch.cuda.is_available():
        return ()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [int(x) for x in listed.split(",") if x.strip().isdigit()] or list(range(torch.cuda.device_count()))
    if len(ids) < nproc:
        raise ValueError(f"--nproc {nproc} but only {len(ids)} GPU(s) visible: {ids}")
    return tuple(ids[:nproc])


def make_executor(
    cfg: Config, nproc: int, time: str | None = None, signal_delay_s: int = 30, max_timeouts: int = 3
) -> submitit.LocalExecutor:
    """A LocalExecutor running ``nproc`` tasks of one run, logging under ``<run_dir>/local/``."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    preempt.use_preempt_signal()
    minutes = parse_time_minutes(time) if time else NO_LIMIT_MIN
    if signal_delay_s >= minutes * 60:
        raise ValueError(f"--signal-delay-s {signal_delay_s} is not shorter than --time {time}")
    # A flat folder: the local controller would create a literal "%j" folder next to per-job ones.
    ex = submitit.LocalExecutor(folder=cfg.run.dir / "local", max_num_timeout=max_timeouts)
    gpus = visible_gpus(nproc)
    ex.update_parameters(
        tasks_per_node=nproc,
        nodes=1,
        timeout_min=minutes,
        signal_delay_s=signal_delay_s,
        gpus_per_node=len(gpus),
        visible_gpus=gpus,
    )
    return ex


def submit(cfg: Config, nproc: int, target: str = DEFAULT_TARGET, **kwargs: object) -> submitit.Job:
    """Start one run on this machine (returns at once); recorded in its run directory."""
    ex = make_executor(cfg, nproc, **kwargs)  # type: ignore[arg-type]
    with clean_env():
        job = ex.submit(TrainTask(cfg, target))
    add_record(cfg.run.dir, job.job_id, "local", job.paths.folder)
    return job


def log_paths(job: submitit.Job) -> list[Path]:
    """The stdout/stderr files of every task of a job."""
    return [p for t in range(job.num_tasks) for p in (job.task(t).paths.stdout, job.task(t).paths.stderr)]
