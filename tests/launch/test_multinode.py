"""Two "nodes" on one machine: each node is a process group of its own (own session, own
environment) and the network is 127.0.0.1. torchrun's c10d rendezvous and the fake SLURM's
two node groups must train to the weights of one node with four ranks (fp32, bit for bit),
with checkpoints and TensorBoard written once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from tests import REPO_ROOT as ROOT
from tests.distutil import free_port
from tests.launch.test_e2e import assert_bit_identical, final_params
from tests.launch.test_launch import fake_slurm  # noqa: F401 (a fixture)

STEPS = 32
TINY = {
    "model": {"name": "orbit-micro"},
    # batch 2 per rank: the global batch of 8 is cut the same way by 1 x 4 and 2 x 2 ranks.
    "data": {"source": "synthetic", "batch_size": 2, "workers": 0, "synthetic_samples": 64,
             "synthetic_image_size": 32},
    "optim": {"warmup_steps": 2},
    "train": {"steps": STEPS, "checkpoint_every": 8, "keep_checkpoints": 4, "log_every": 4, "progress": False,
              "precision": "fp32", "device": "cpu"},
    "eval": {"at_end": False},
}
DEADLINE_S = 180
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


EVAL = {"at_end": True, "benchmarks": ["demo"], "batch_size": 64}
"""Evaluation at the end (400 held-out synthetic scenes), shared by every rank."""


def write_tiny(tmp: Path, name: str, evaluate: bool = False, **train: object) -> Path:
    data = {**TINY, "run": {"root": str(tmp / "runs"), "name": name}, "train": {**TINY["train"], **train}}
    if evaluate:
        data["eval"] = EVAL
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


def start_node(config: Path, node: int, endpoint: str, log: Path, nnodes: int = 2, nproc: int = 2,
               restarts: int = 0) -> subprocess.Popen:
    """One node as a cluster script starts it: torchrun with the shared c10d endpoint."""
    cmd = [*TORCHRUN, "--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--node-rank", str(node),
           "--max-restarts", str(restarts),
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
    """Kill every node: its process tree (torchrun's ranks run in sessions of their own), then its group."""
    for p in procs:
        for pid in tree(p.pid) if p.poll() is None else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def assert_written_once(run_dir: Path, logs: list[Path]) -> None:
    """One TensorBoard file, the checkpoints of one writer, each reported by rank 0 alone."""
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000008", "step_0000016", "step_0000024", "step_0000032"]
    said = [m.group(1) for log in logs for line in log.read_text().splitlines()
            if (m := re.search(r"\[rank (\d+)\] INFO (?:train: )?checkpoint ", line))]
    assert said == ["0"] * 4, said


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    """The reference: one node, four ranks (torchrun, one process group)."""
    tmp = tmp_path_factory.mktemp("one-node")
    log = tmp / "node.log"
    cmd = [*TORCHRUN, "--nproc-per-node", "4", "--master-port", str(free_port()), "-m", "train",
           "--config", str(write_tiny(tmp, "ref", evaluate=True))]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=node_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    assert wait_all([proc], [log]) == [0], log.read_text()[-3000:]
    return tmp / "runs" / "ref"


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_node_of_four(tmp_path, four_ranks):
    config = write_tiny(tmp_path, "two", evaluate=True)
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = [start_node(config, n, endpoint, logs[n]) for n in (0, 1)]
    codes = wait_all(procs, logs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    # Both nodes joined one job of four ranks (each node ran two of them).
    text = [log.read_text() for log in logs]
    assert all(len(set(re.findall(r"\[rank (\d)\]", t))) == 2 for t in text), text
    run_dir = tmp_path / "runs" / "two"
    extra = torch.load(run_dir / "checkpoints" / "step_0000032" / "extra.pt", weights_only=False)
    assert extra["world_size"] == 4
    assert_written_once(run_dir, logs)
    assert_bit_identical(final_params(run_dir), final_params(four_ranks))
    # The evaluation at the end, shared by the four ranks of two nodes, gives the one node's
    # results, written once (by rank 0).
    results = [json.loads((d / "eval" / "step_0000032.json").read_text()) for d in (run_dir, four_ranks)]
    assert results[0] == results[1] and results[0]["results"]["demo/acc1"] > 0, results
    assert sorted(p.name for p in (run_dir / "eval").glob("*.json")) == ["step_0000032.json"]


# ---------------------------------------------------------------- SLURM (fake sbatch/srun, two node groups)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def recording_run(cfg, env):
    """The job's target: record what this task derived from SLURM, then train as ``launch`` does."""

    from train.api import dist_env_from
    from train.trainer import run

    slurm_only = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    seen = {
        "slurm": {k: os.environ.get(k) for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURMD_NODENAME",
                                                 "SLURM_JOB_NODELIST")},
        "job": [env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.master_port,
                env.device_index(2)],
        "distenv": [(d := dist_env_from(slurm_only)).rank, d.world_size, d.local_rank, d.local_world_size,
                    d.master_addr, d.master_port, d.device_index(2)],
        "pgid": os.getpgid(0),
        "hostnames": subprocess.run(["scontrol", "show", "hostnames"], capture_output=True, text=True,
                                    check=True).stdout.split(),
    }
    (Path(cfg.run.root) / f"task{env.rank}.json").write_text(json.dumps(seen))
    return run(cfg, env)


@pytest.mark.slow
def test_two_slurm_nodes_equal_one_node_of_four(tmp_path, capsys, fake_slurm, four_ranks):  # noqa: F811

    from launch import cli
    from launch.task import port_for_job
    from tests.launch.test_launch import fakeslurm

    config = write_tiny(tmp_path, "slurm")
    code = cli.main(["slurm", "--config", str(config), "--nodes", "2", "--gpus-per-node", "2", "--partition", "cpu",
                     "--time", "1:00:00", "--target", "tests.launch.test_multinode:recording_run"])
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    run_dir = tmp_path / "runs" / "slurm"
    state = fakeslurm.wait_state(fake_slurm, job_id, {"COMPLETED", "FAILED"}, DEADLINE_S)
    logs = sorted((run_dir / "slurm" / job_id).glob("*_log.err"))
    assert state == "COMPLETED", "\n".join(log.read_text()[-2000:] for log in logs)
    tasks = [json.loads((tmp_path / "runs" / f"task{r}.json").read_text()) for r in range(4)]
    port = port_for_job(job_id)
    for rank, task in enumerate(tasks):
        node, local = divmod(rank, 2)
        assert task["slurm"] == {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
                                 "SLURMD_NODENAME": ["localhost", "127.0.0.1"][node],
                                 "SLURM_JOB_NODELIST": "localhost,127.0.0.1"}
        assert task["hostnames"] == ["localhost", "127.0.0.1"]
        # rank, world, local rank, local world, master address and port, GPU index (of 2)
        assert task["job"] == [rank, 4, local, 2, "localhost", port, local]
        assert task["distenv"][:5] + task["distenv"][6:] == [rank, 4, local, 2, "localhost", local]
    assert len({t["distenv"][5] for t in tasks}) == 1  # one rendezvous port for the whole job
    # Two node groups, two tasks each.
    assert tasks[0]["pgid"] == tasks[1]["pgid"] != tasks[2]["pgid"] == tasks[3]["pgid"]
    assert_written_once(run_dir, logs)
    assert_bit_identical(final_params(run_dir), final_params(four_ranks))


# ---------------------------------------------------------------- a stalled node (SIGSTOP), then SIGCONT

PEER_TIMEOUT_S = 6.0


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun's workers run in sessions of their own)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return out


def signal_node(proc: subprocess.Popen, sig: int) -> None:
    """Every process of a node (agent and workers), as when its host stalls."""
    for pid in tree(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_for(path: Path, procs: list[subprocess.Popen], deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not path.exists():
        assert all(p.poll() is None for p in procs), f"a node ended before {path.name}"
        assert time.monotonic() < end, f"no {path} after {deadline_s} s"
        time.sleep(0.02)


def wait_listening(endpoint: str, proc: subprocess.Popen) -> None:
    """Until node 0's torchrun serves the rendezvous (so it, not node 1, hosts the job's store)."""
    import socket

    host, port = endpoint.rsplit(":", 1)
    end = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        assert proc.poll() is None and time.monotonic() < end, "node 0 never served the rendezvous"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_stopped_node_is_survived_when_it_continues_and_named_when_it_does_not(tmp_path, four_ranks):
    config = write_tiny(tmp_path, "stall", peer_timeout_s=PEER_TIMEOUT_S)
    run_dir = tmp_path / "runs" / "stall"
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = [start_node(config, 0, endpoint, logs[0])]
    try:
        wait_listening(endpoint, procs[0])
        procs.append(start_node(config, 1, endpoint, logs[1]))
        # 1) Stopped for half the bound between steps, then continued: the run goes on unharmed.
        wait_for(run_dir / "checkpoints" / "step_0000008", procs)
        signal_node(procs[1], signal.SIGSTOP)
        time.sleep(PEER_TIMEOUT_S / 2)
        signal_node(procs[1], signal.SIGCONT)
        wait_for(run_dir / "checkpoints" / "step_0000016" / "MANIFEST.json", procs)
        # 2) Stopped for good: node 0's ranks name node 1's ranks and exit non-zero within the bound.
        signal_node(procs[1], signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[0].wait(timeout=60)
        node0_done = time.monotonic() - stopped
    finally:
        kill_sessions(procs)
        for p in procs[1:]:
            signal_node(p, signal.SIGKILL)
    text = logs[0].read_text()
    node1_ranks = sorted(set(re.findall(r"\[rank (\d)\]", logs[1].read_text())))
    assert len(node1_ranks) == 2, logs[1].read_text()[-2000:]
    reports = re.findall(r"^rank (\d): peer ranks stalled or lost: (.*?); this rank was (.*?) "
                         rf"\(train.peer_timeout_s={PEER_TIMEOUT_S:g}\): stopping$", text, re.M)
    assert len(reports) == 2, text[-3000:]  # one line from each of node 0's ranks
    assert sorted(r for r, _, _ in reports) == sorted({"0", "1", "2", "3"} - set(node1_ranks))
    for _, who, where in reports:
        silent = re.findall(r"rank (\d) silent for ([\d.]+) s", who)
        assert sorted(r for r, _ in silent) == node1_ranks
        assert all(PEER_TIMEOUT_S <= float(s) < PEER_TIMEOUT_S + 2 for _, s in silent), silent
        assert re.fullmatch(r"in step \d+|checkpointing step \d+", where), where
    assert code != 0
    print(f"node 0 ended {node0_done:.1f} s after node 1 stopped")
    assert node0_done < PEER_TIMEOUT_S + 20, node0_done  # the ranks within the bound, torchrun's teardown after
    assert_bit_identical(
        torch.load(run_dir / "checkpoints" / "step_0000016" / "model.pt", weights_only=True),
        torch.load(four_ranks / "checkpoints" / "step_0000016" / "model.pt", weights_only=True),
    )


# ---------------------------------------------------------------- a lost node (SIGKILL), then resume

def wait_for_manifest(run_dir: Path, step: int, alive: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
    """Until checkpoint ``step`` is complete (its manifest written last), while ``alive()``."""
    path = run_dir / "checkpoints" / f"step_{step:07d}" / "MANIFEST.json"
    end = time.monotonic() + deadline_s
    while not path.exists():
        assert alive(), f"the run ended before checkpoint {step}"
        assert time.monotonic() < end, f"no {path} after {deadline_s} s"
        time.sleep(0.02)


def submit_two_nodes(config: Path, capsys, *extra: str) -> str:
    from launch import cli

    code = cli.main(["slurm", "--config", str(config), "--nodes", "2", "--gpus-per-node", "2", "--partition", "cpu",
                     "--time", "1:00:00", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return re.search(r"submitted job (\d+)", out).group(1)


@pytest.mark.slow
@pytest.mark.parametrize("requeues", [3, 0])
def test_a_killed_slurm_node_requeues_the_job_which_resumes_to_equal_weights(
        tmp_path, capsys, fake_slurm, four_ranks, requeues):  # noqa: F811
    from tests.launch.test_launch import fakeslurm

    config = write_tiny(tmp_path, "lost")
    job_id = submit_two_nodes(config, capsys, "--max-peer-requeues", str(requeues))
    run_dir = tmp_path / "runs" / "lost"
    state_file = fake_slurm / f"{job_id}.state"
    wait_for_manifest(run_dir, 16, lambda: not state_file.exists() or state_file.read_text() in ("PENDING", "RUNNING"))
    os.killpg(int((fake_slurm / f"{job_id}.node1.pgid").read_text()), signal.SIGKILL)  # node 1, all its ranks
    state = fakeslurm.wait_state(fake_slurm, job_id, {"COMPLETED", "FAILED"}, DEADLINE_S)
    logs = "\n".join(p.read_text() for p in sorted((run_dir / "slurm" / job_id).glob("*_log.err")))
    runs = (fake_slurm / f"{job_id}.runs").read_text()
    if requeues == 0:  # the mechanism off: the job fails, it is not started again
        assert (state, runs) == ("FAILED", "1"), logs[-3000:]
        assert "no requeue left for lost peers" in logs
        return
    assert (state, runs) == ("COMPLETED", "2"), logs[-3000:]
    said = re.findall(r"\[rank 0\] WARNING launch.task: rank 0: a peer rank was lost at step (\d+) .*; requeueing the job",
                      logs)
    assert len(said) == 1 and 16 <= int(said[0]) <= STEPS, logs[-3000:]
    assert re.search(r"resum\w* .*step[ _]0*(16|24)", logs), logs[-3000:]
    assert_bit_identical(final_params(run_dir), final_params(four_ranks))


@pytest.mark.slow
def test_a_torchrun_node_whose_ranks_were_killed_restarts_and_resumes_to_equal_weights(tmp_path, four_ranks):
    """Both ranks of node 1 SIGKILLed between checkpoints (its agent stays, as a node's job
    step does): node 0's ranks name the loss and exit, both agents restart their ranks
    (--max-restarts 1), and auto-resume continues from the last complete checkpoint to the
    weights of the uninterrupted run."""
    config = write_tiny(tmp_path, "restart")
    run_dir = tmp_path / "runs" / "restart"
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [start_node(config, 0, endpoint, logs[0], restarts=1)]
    try:
        wait_listening(endpoint, procs[0])
        procs.append(start_node(config, 1, endpoint, logs[1], restarts=1))
        wait_for_manifest(run_dir, 16, lambda: all(p.poll() is None for p in procs))
        workers = [pid for pid in tree(procs[1].pid) if pid != procs[1].pid]
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        codes = wait_all(procs, logs)
    finally:
        kill_sessions(procs)
    text = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], text[-4000:]
    assert re.search(r"a peer rank was lost at step (1[6-9]|2\d|3[0-2])", text), text[-3000:]
    assert re.search(r"resumed from \S*step_00000(16|24) at step (16|24)", text), text[-3000:]
    assert_bit_identical(final_params(run_dir), final_params(four_ranks))
