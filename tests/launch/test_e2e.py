"""launch end to end with the real trainer on a tiny config (orbit-micro, synthetic data, CPU):
DebugExecutor (in process), LocalExecutor (2 tasks, gloo), and the real submitit SLURM path
through fake sbatch/srun/sacct/scancel/scontrol with a preemption mid-run that must end with
parameters bit-identical to the uninterrupted 2-task run.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import submitit
import torch

from launch import cli
from launch.status import run_status
from launch.sweep import resolve_runs
from launch.task import TrainTask
from tests.launch.test_launch import fake_slurm, fakeslurm, write_config  # noqa: F401 (fake_slurm is a fixture)

STEPS = 20
TINY = {
    "model": {"name": "orbit-micro"},
    "data": {"source": "synthetic", "batch_size": 8, "workers": 0, "synthetic_samples": 256,
             "synthetic_image_size": 32},
    "train": {"steps": STEPS, "checkpoint_every": 4, "log_every": 4, "progress": False, "device": "cpu"},
    "eval": {"at_end": False},
}


def tiny_config(tmp: Path, name: str) -> Path:
    return write_config(tmp, name, **TINY)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ: {different[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-task run through ``python -m launch local`` (submitit LocalExecutor)."""
    tmp = tmp_path_factory.mktemp("ref")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the tasks inherit it: 2 ranks on 2 cores
    try:
        code = cli.main(["local", "--nproc", "2", "--config", str(tiny_config(tmp, "ref"))])
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old
    assert code == 0
    return tmp / "runs" / "ref"


def test_local_executor_two_tasks_trains(reference):
    st = run_status(reference)
    assert [(j.executor, j.state) for j in st.jobs] == [("local", "COMPLETED")]
    assert f"trainer returned finished at step {STEPS}" in st.jobs[0].detail
    assert st.checkpoint_step == STEPS and st.logged_step == STEPS
    logs = sorted(p.name for p in (reference / "local").glob("*_log.err"))
    assert [re.sub(r"^\d+_", "", n) for n in logs] == ["0_log.err", "1_log.err"]  # two tasks ran
    extra = torch.load(st.checkpoint / "extra.pt", map_location="cpu", weights_only=False)
    assert extra["world_size"] == 2 and len(extra["data"]) == 2  # both tasks joined one process group
    assert all(torch.isfinite(t).all() for t in final_params(reference).values())


def test_debug_executor_runs_the_trainer_in_process(tmp_path):
    cfg = resolve_runs(str(tiny_config(tmp_path, "dbg")), ["train.steps=3"], []).configs[0]
    job = submitit.DebugExecutor(tmp_path / "dbg").submit(TrainTask(cfg))
    result = job.result()
    assert (result.status, result.step) == ("finished", 3)
    assert (cfg.run.dir / "model.pt").is_file() and (cfg.run.dir / "checkpoints" / "latest").read_text().strip()


def test_slurm_preemption_requeues_and_resumes_bit_identical(tmp_path, capsys, fake_slurm, reference):  # noqa: F811
    code = cli.main(
        ["slurm", "--config", str(tiny_config(tmp_path, "pre")), "--nodes", "1", "--gpus-per-node", "2",
         "--partition", "cpu", "--time", "1:00:00"]
    )
    out = capsys.readouterr().out
    assert code == 0
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    run_dir = tmp_path / "runs" / "pre"
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "latest").exists():  # training is under way
        assert time.time() < deadline, "the job never wrote a checkpoint"
        assert fakeslurm.wait_state(fake_slurm, job_id, {"RUNNING", "PENDING"}, 1) in {"RUNNING", "PENDING"}
        time.sleep(0.1)
    job = submitit.SlurmJob(folder=run_dir / "slurm" / job_id, job_id=job_id)
    job._interrupt()  # submitit's own preemption simulation: scancel --signal SIGTERM, then USR1
    assert fakeslurm.wait_state(fake_slurm, job_id, {"COMPLETED", "FAILED"}, 240) == "COMPLETED"
    assert (fake_slurm / f"{job_id}.runs").read_text() == "2", "the job was not requeued"
    err0 = (run_dir / "slurm" / job_id / f"{job_id}_0_log.err").read_text()
    stopped = int(re.search(r"preempted at step (\d+): requeueing", err0).group(1))
    assert 4 <= stopped < STEPS
    # the requeued job continued from the checkpoint written at the stop, not from scratch
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:07d} at step {stopped}" in err0
    assert job.result().status == "finished"
    st = run_status(run_dir)
    assert [(j.job_id, j.state) for j in st.jobs] == [(job_id, "COMPLETED")]
    assert st.checkpoint_step == STEPS
    assert_bit_identical(final_params(run_dir), final_params(reference))
