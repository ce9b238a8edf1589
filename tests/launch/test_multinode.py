"""Two "nodes" on one machine: each node is a process group of its own (own session, own
environment) and the network is 127.0.0.1. torchrun's c10d rendezvous and the fake SLURM's
two node groups must train to the weights of one node with four ranks (fp32, bit for bit),
with checkpoints and TensorBoard written once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests import REPO_ROOT as ROOT
from tests.distutil import free_port

STEPS = 6
TINY = {
    "model": {"name": "orbit-micro"},
    # batch 2 per rank: the global batch of 8 is cut the same way by 1 x 4 and 2 x 2 ranks.
    "data": {"source": "synthetic", "batch_size": 2, "workers": 0, "synthetic_samples": 64,
             "synthetic_image_size": 32},
    "optim": {"warmup_steps": 2},
    "train": {"steps": STEPS, "checkpoint_every": 3, "log_every": 2, "progress": False, "precision": "fp32",
              "device": "cpu"},
    "eval": {"at_end": False},
}
DEADLINE_S = 180
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def write_tiny(tmp: Path, name: str, **train: object) -> Path:
    data = {**TINY, "run": {"root": str(tmp / "runs"), "name": name}, "train": {**TINY["train"], **train}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def node_env(**extra: str) -> dict[str, str]:
    """A node's environment: this checkout first on the path, one thread per rank (2 cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    path = env.get("PYTHONPATH")
    env.update(PYTHONPATH=f"{ROOT}:{path}" if path else str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               **extra)
    return env


def start_node(config: Path, node: int, endpoint: str, log: Path, nnodes: int = 2, nproc: int = 2) -> subprocess.Popen:
    """One node as a cluster script starts it: torchrun with the shared c10d endpoint."""
    cmd = [*TORCHRUN, "--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--node-rank", str(node),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "orbitclip-test",
           "-m", "train", "--config", str(config)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=node_env(ORBITCLIP_TEST_NODE=str(node)), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], deadline_s: float = DEADLINE_S) -> list[int]:
    """Exit codes of every node; kills them all (their whole sessions) at the deadline."""
    end = time.monotonic() + deadline_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
        pytest.fail(f"nodes still running after {deadline_s} s:\n{tails}")
    finally:
        kill_sessions(procs)
    return [p.returncode for p in procs]


def kill_sessions(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ: {different[:5]}"


def assert_written_once(run_dir: Path, logs: list[Path]) -> None:
    """One TensorBoard file, the checkpoints of one writer, each reported by rank 0 alone."""
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000003", "step_0000006"]
    lines = [line for log in logs for line in log.read_text().splitlines() if " INFO checkpoint " in line]
    assert len(lines) == 2 and all("[rank 0]" in line for line in lines), lines


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    """The reference: one node, four ranks (torchrun, one process group)."""
    tmp = tmp_path_factory.mktemp("one-node")
    log = tmp / "node.log"
    cmd = [*TORCHRUN, "--nproc-per-node", "4", "--master-port", str(free_port()), "-m", "train",
           "--config", str(write_tiny(tmp, "ref"))]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=node_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    assert wait_all([proc], [log]) == [0], log.read_text()[-3000:]
    return tmp / "runs" / "ref"


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_node_of_four(tmp_path, four_ranks):
    config = write_tiny(tmp_path, "two")
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = [start_node(config, n, endpoint, logs[n]) for n in (0, 1)]
    codes = wait_all(procs, logs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    # Both nodes joined one job of four ranks (each node ran two of them).
    text = [log.read_text() for log in logs]
    assert all(len(set(re.findall(r"\[rank (\d)\]", t))) == 2 for t in text), text
    run_dir = tmp_path / "runs" / "two"
    extra = torch.load(run_dir / "checkpoints" / "step_0000006" / "extra.pt", weights_only=False)
    assert extra["world_size"] == 4
    assert_written_once(run_dir, logs)
    assert_bit_identical(final_params(run_dir), final_params(four_ranks))
