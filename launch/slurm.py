"""Submit training runs to SLURM through submitit's SlurmExecutor (it writes the sbatch text)."""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import clean_env

from launch import preempt
from launch.jobs import add_record
from launch.task import DEFAULT_TARGET, TrainTask
from launch.sweep import RunSet

IMPORT_ROOT = Path(__file__).resolve().parents[1]
"""The folder our packages are imported from (a checkout, or site-packages when installed): the
job's PYTHONPATH starts with it so that the job runs this same code."""


@dataclass
class SlurmRequest:
    """What to ask SLURM for; one task per GPU."""

    nodes: int
    gpus_per_node: int
    time: str
    """Wall time as SLURM writes it: ``MM``, ``HH:MM:SS``, ``D-HH:MM`` ..."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    """Per node, SLURM syntax (``64G``, ``500000M``)."""
    cpus_per_task: int | None = None
    exclude: str | None = None
    signal_delay_s: int = 120
    """Seconds before the time limit at which USR1 asks the trainer to checkpoint."""
    max_timeouts: int = 20
    """How many times a run may be requeued after reaching its time limit."""
    max_peer_requeues: int = 3
    """How many times a run may be requeued after losing a rank or a node (resuming from its
    last complete checkpoint); 0 = a lost peer ends the job."""
    setup: list[str] = field(default_factory=list)
    """Extra shell lines run before srun (``module load ...``)."""


def parse_time_minutes(text: str) -> int:
    """SLURM time syntax -> whole minutes (rounded up): ``01:00:00`` -> 60, ``1-00:00`` -> 1440."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = (nums + [0, 0])[:3]
        seconds = int(days) * 86400 + h * 3600 + mi * 60 + s
    elif len(nums) == 1:  # MM
        seconds = nums[0] * 60
    elif len(nums) == 2:  # MM:SS
        seconds = nums[0] * 60 + nums[1]
    else:  # HH:MM:SS
        seconds = nums[0] * 3600 + nums[1] * 60 + nums[2]
    if seconds <= 0:
        raise ValueError(f"--time {text!r} must be positive")
    return math.ceil(seconds / 60)


def executor_parameters(req: SlurmRequest, job_name: str) -> dict[str, Any]:
    """SlurmExecutor parameters for a request (submitit's own names; None = SLURM default)."""
    if req.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {req.nodes}")
    if req.max_peer_requeues < 0:
        raise ValueError(f"--max-peer-requeues must be >= 0, got {req.max_peer_requeues}")
    if req.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be >= 0, got {req.gpus_per_node}")
    minutes = parse_time_minutes(req.time)
    if req.signal_delay_s >= minutes * 60:
        raise ValueError(f"--signal-delay-s {req.signal_delay_s} is not shorter than --time {req.time}")
    if req.mem is not None and not re.fullmatch(r"\d+[KMGT]?B?", req.mem):
        raise ValueError(f"--mem {req.mem!r}: expected SLURM syntax like 64G or 500000M")
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": minutes,
        "nodes": req.nodes,
        "ntasks_per_node": max(1, req.gpus_per_node),  # one task per GPU
        "gpus_per_node": req.gpus_per_node or None,
        "partition": req.partition,
        "account": req.account,
        "qos": req.qos,
        "constraint": req.constraint,
        "mem": req.mem,
        "cpus_per_task": req.cpus_per_task,
        "exclude": req.exclude,
        "signal_delay_s": req.signal_delay_s,
        # The job must be able to import this project wherever SLURM starts it.
        "setup": [*preempt.setup_lines(), f"export PYTHONPATH={shlex.quote(str(IMPORT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}", *req.setup],
        # scontrol requeue (what submitit does on preemption) needs a requeueable job.
        "additional_parameters": {"requeue": True},
    }
    return {k: v for k, v in params.items() if v is not None}


class _OfflineSlurmExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that can be built where ``srun`` is missing: for --dry-run text only."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def submitit_folder(runs: RunSet) -> Path:
    """``<run_dir>/slurm/%j``; a sweep's array shares ``<root>/<base name>/slurm/%j`` (ids ``%A_%a``)."""
    base = runs.configs[0].run.dir if not runs.is_array else runs.root / runs.name
    return base / "slurm" / "%j"


def make_executor(runs: RunSet, req: SlurmRequest, offline: bool = False) -> submitit.SlurmExecutor:
    """A configured executor for these runs (``offline``: no SLURM needed, cannot submit)."""
    preempt.use_preempt_signal()
    cls = _OfflineSlurmExecutor if offline else submitit.SlurmExecutor
    ex = cls(folder=submitit_folder(runs), max_num_timeout=req.max_timeouts)
    ex.update_parameters(**executor_parameters(req, runs.configs[0].run.name if not runs.is_array else runs.name))
    return ex


def sbatch_text(runs: RunSet, req: SlurmRequest) -> str:
    """The sbatch script submitit would submit for these runs (a job array for a sweep)."""
    ex = make_executor(runs, req, offline=True)
    if runs.is_array:
        ex.parameters["map_count"] = len(runs.configs)  # what submitit sets for its array submission
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def submit(runs: RunSet, req: SlurmRequest, target: str = DEFAULT_TARGET) -> list[submitit.Job]:
    """Submit the runs (one job, or one job array for a sweep); records each in its run dir."""
    cfgs = runs.configs
    ex = make_executor(runs, req)
    # A submission from inside a job must not inherit that job's SLURM_*/RANK variables.
    with clean_env():
        if not runs.is_array:
            jobs = [ex.submit(TrainTask(cfgs[0], target, peer_requeues=req.max_peer_requeues))]
        else:
            with ex.batch():
                delayed = [ex.submit(TrainTask(c, target, peer_requeues=req.max_peer_requeues)) for c in cfgs]
            jobs = list(delayed)
    for cfg, job in zip(cfgs, jobs):
        add_record(cfg.run.dir, job.job_id, "slurm", job.paths.folder)
    return jobs
