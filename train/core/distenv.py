"""Rank, world and rendezvous from the environment: one pure function.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; SLURM (srun,
submitit) sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST. A plain
``python -m train`` sets neither and is rank 0 of 1. torchrun's variables win when
both are present (torchrun inside an allocation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: Literal["single", "torchrun", "slurm"] = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"

    def device_index(self, device_count: int) -> int:
        """This rank's GPU among the ``device_count`` of its node: its local rank (wrapped,
        so that several ranks may share GPUs in a rehearsal)."""
        if device_count < 1:
            raise ValueError(f"device_count must be >= 1, got {device_count}")
        return self.local_rank % device_count


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu[03-05,7],cpu1`` -> ``gpu03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _port_for_job(job_id: str) -> int:
    # A job-specific port keeps two jobs sharing a node from colliding.
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def dist_env_from(env: Mapping[str, str]) -> DistEnv:
    """Build the :class:`DistEnv` of a process from its environment variables."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=max(1, world // max(1, nodes)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or _port_for_job(env.get("SLURM_JOB_ID", "0"))),
            launcher="slurm",
        )
    return DistEnv()
