"""launch: sweeps, sbatch text (dry run, no SLURM), the task's requeue hook, status, and the
real submitit SLURM path driven through fake sbatch/srun/sacct/scontrol (stand-in trainer).

The end-to-end runs of the real trainer are in test_launch_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import yaml

from launch import cli
from launch import slurm as slurm_mod
from launch.jobs import add_record, read_records
from launch.slurm import parse_time_minutes
from launch.status import format_status, run_status
from launch.sweep import expand, resolve_runs, split_values
from launch.task import TrainTask, job_dist_env, port_for_job
from train.core.configbase import ConfigError

FAKE_SLURM = Path(__file__).parent / "fake_slurm"
sys.path.insert(0, str(FAKE_SLURM))
import fakeslurm  # noqa: E402


def write_config(tmp: Path, name: str = "demo", **sections: dict) -> Path:
    data = {
        "run": {"name": name, "root": str(tmp / "runs")},
        "model": {"name": "orbit-micro"},
        "data": {"source": "synthetic", "batch_size": 8},
        "train": {"steps": 10},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- sweeps


def test_sweep_is_the_cartesian_product_with_named_members():
    points = expand(["optim.lr=1e-4,5e-5", "data.batch_size=512,1024", "train.seed=3"])
    assert [p.overrides for p in points] == [
        ["optim.lr=1e-4", "data.batch_size=512", "train.seed=3"],
        ["optim.lr=1e-4", "data.batch_size=1024", "train.seed=3"],
        ["optim.lr=5e-5", "data.batch_size=512", "train.seed=3"],
        ["optim.lr=5e-5", "data.batch_size=1024", "train.seed=3"],
    ]
    # single-valued axes are plain overrides: not in the name
    assert [p.suffix for p in points] == [
        "lr=1e-4_batch_size=512", "lr=1e-4_batch_size=1024", "lr=5e-5_batch_size=512", "lr=5e-5_batch_size=1024",
    ]
    assert expand([])[0].suffix == "" and expand([])[0].overrides == []


def test_sweep_values_keep_lists_whole_and_bad_specs_are_errors():
    assert split_values("[0.9,0.98],[0.9,0.95]") == ["[0.9,0.98]", "[0.9,0.95]"]
    for bad in (["optim.lr"], ["optim.lr=1e-4,"], ["optim.lr=1,1"], ["optim.lr=[1,2"], ["a=1,2", "a=3,4"]):
        with pytest.raises(ConfigError):
            expand(bad)


def test_resolve_runs_validates_every_member_and_makes_root_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, run={"root": "rel"})
    runs = resolve_runs(str(cfg), ["train.steps=7"], ["optim.lr=1e-4,5e-5"])
    assert runs.is_array and runs.name == "demo"
    assert [c.run.name for c in runs.configs] == ["demo-lr=1e-4", "demo-lr=5e-5"]
    assert [c.optim.lr for c in runs.configs] == [1e-4, 5e-5]
    assert all(c.train.steps == 7 and Path(c.run.root) == tmp_path / "rel" for c in runs.configs)
    with pytest.raises(ConfigError, match="optim.lrr"):
        resolve_runs(str(cfg), [], ["optim.lrr=1,2"])
    with pytest.raises(ConfigError, match="batch_size"):  # member 2 does not validate
        resolve_runs(str(cfg), ["train.accum_steps=2"], ["data.batch_size=8,9"])


def test_parse_time():
    assert parse_time_minutes("01:00:00") == 60
    assert parse_time_minutes("90") == 90
    assert parse_time_minutes("1-12:00:00") == 36 * 60
    assert parse_time_minutes("00:00:30") == 1  # rounded up, never 0
    for bad in ("1h", "", "00:00:00", "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_time_minutes(bad)


# ---------------------------------------------------------------- dry run (no SLURM)


def _sbatch_lines(out: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?$", out, flags=re.M))


def test_dry_run_prints_the_sbatch_script_without_slurm(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no srun/sbatch anywhere
    cfg = write_config(tmp_path)
    code, out, err = run_cli(
        ["slurm", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
         "--time", "01:00:00", "--account", "proj", "--qos", "high", "--constraint", "a100", "--mem", "64G",
         "--cpus-per-task", "8", "optim.lr=2e-4", "--dry-run"],
        capsys,
    )
    assert code == 0, err
    flags = _sbatch_lines(out)
    run_dir = tmp_path / "runs" / "demo"
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "4" and flags["gpus-per-node"] == "4"
    assert flags["time"] == "60" and flags["partition"] == "gpu" and flags["account"] == "proj"
    assert flags["qos"] == "high" and flags["constraint"] == "a100" and flags["mem"] == "64G"
    assert flags["cpus-per-task"] == "8" and flags["job-name"] == "demo"
    assert re.fullmatch(r"USR1@\d+", flags["signal"])
    assert "requeue" in flags
    assert flags["output"] == f"{run_dir}/slurm/%j/%j_0_log.out"
    assert flags["error"] == f"{run_dir}/slurm/%j/%j_0_log.err"
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in out
    assert re.search(rf"^srun .*--output {run_dir}/slurm/%j/%j_%t_log.out .* -m submitit.core._submit", out, re.M)
    # the resolved config follows, with the override applied
    resolved = yaml.safe_load(out.split("# ---- resolved config: ")[1].split("\n", 1)[1])
    assert resolved["optim"]["lr"] == 2e-4 and resolved["run"]["root"] == str(tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # nothing submitted, nothing written


def test_dry_run_of_a_sweep_is_one_job_array(tmp_path, capsys):
    cfg = write_config(tmp_path)
    code, out, err = run_cli(
        ["slurm", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "1", "--partition", "gpu",
         "--time", "10:00", "--dry-run", "--sweep", "optim.lr=1e-4,5e-5", "data.batch_size=8,16", "train.seed=1,2"],
        capsys,
    )
    assert code == 0, err
    flags = _sbatch_lines(out)
    assert flags["array"] == "0-7%8"
    assert flags["output"] == f"{tmp_path}/runs/demo/slurm/%A_%a/%A_%a_0_log.out"
    assert out.count("# ---- resolved config:") == 8
    assert f"resolved config: {tmp_path}/runs/demo-lr=5e-5_batch_size=16_seed=2\n" in out


@pytest.mark.parametrize(
    "extra, message",
    [(["optim.nope=1"], "optim.nope"), (["--time", "soon"], "--time"), (["--mem", "lots"], "--mem")],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, extra, message):
    cfg = write_config(tmp_path)
    argv = ["slurm", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "1", "--partition", "p",
            "--time", "1:00:00", "--dry-run", *extra]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and message in err


def test_unknown_option_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["local", "--config", "x.yaml", "--nprocs", "2"])
    assert "--nprocs" in capsys.readouterr().err


# ---------------------------------------------------------------- the task object


def test_checkpoint_resubmits_the_same_run_with_resume_auto(tmp_path):
    cfg = resolve_runs(str(write_config(tmp_path, train={"resume": None})), [], []).configs[0]
    task = TrainTask(cfg, target="tests.launch.test_launch:standin_run")
    delayed = task.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    new = delayed.function
    assert type(new) is TrainTask and new is not task and new.target == task.target
    assert new.cfg.train.resume == "auto" and task.cfg.train.resume is None
    assert new.cfg.run == cfg.run and new.cfg.optim == cfg.optim and new.cfg.model == cfg.model


def test_a_lost_peer_requeues_while_requeues_are_left_and_each_requeue_counts(tmp_path):
    import pickle

    from train.api import PeerLostError

    cfg = resolve_runs(str(write_config(tmp_path, train={"resume": None})), [], []).configs[0]
    calls = []
    task = TrainTask(cfg, target="tests.launch.test_launch:standin_run", peer_requeues=1)
    task._requeue_for_lost_peer(lambda sig, frame: calls.append(task.checkpoint()), "rank 0: a peer rank was lost")
    assert len(calls) == 1
    again = calls[0].function
    assert again.peer_requeues == 0 and again.cfg.train.resume == "auto"
    again._requeue_for_lost_peer(lambda sig, frame: calls.append("requeued"), "rank 0: lost again")
    assert len(calls) == 1  # none left: the job ends
    # A preemption (no lost peer) keeps the count; a job pickle of an older version has the default.
    assert TrainTask(cfg, peer_requeues=2).checkpoint().function.peer_requeues == 2
    old = TrainTask(cfg)
    del old.__dict__["peer_requeues"]
    assert pickle.loads(pickle.dumps(old)).peer_requeues == 3
    assert issubclass(PeerLostError, RuntimeError)


def heartbeat_reporting_run(cfg, env):
    """A stand-in trainer whose heartbeat reports a stalled peer (the hook only: no exit)."""
    from train.core import heartbeat

    heartbeat._on_lost("rank 0: peer ranks stalled or lost: rank 1 silent for 6.0 s")
    return SimpleNamespace(status="finished", step=1)


def test_a_heartbeat_report_on_rank_0_requeues_through_submitit_and_the_hook_is_removed_after(tmp_path, monkeypatch):
    from launch import task as task_mod
    from train.core import heartbeat

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # the task exports them: restored after the test

    calls = []
    monkeypatch.setattr(task_mod, "_submitit_requeue_handler", lambda: lambda sig, frame: calls.append(sig))
    cfg = resolve_runs(str(write_config(tmp_path)), [], []).configs[0]
    task = TrainTask(cfg, target="tests.launch.test_launch:heartbeat_reporting_run", peer_requeues=2)
    assert task().status == "finished"
    assert len(calls) == 1 and task._lost_peer
    assert task.checkpoint().function.peer_requeues == 1
    assert heartbeat._on_lost is None


def test_max_peer_requeues_reaches_the_task_and_must_not_be_negative(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path)
    base = ["slurm", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "10:00"]
    code, out, err = run_cli([*base, "--max-peer-requeues", "-1", "--dry-run"], capsys)
    assert code == 2 and "--max-peer-requeues" in err
    seen: dict = {}
    monkeypatch.setattr(slurm_mod, "make_executor", lambda runs, req, offline=False: _Recorder(seen))
    code, out, err = run_cli([*base, "--max-peer-requeues", "5"], capsys)
    assert code == 0, err
    assert seen["task"].peer_requeues == 5


class _Recorder:
    """An executor stand-in that records the submitted task."""

    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def submit(self, task):
        self.seen["task"] = task

        class Job:
            job_id = "1"

            class paths:
                folder = "/nowhere"
        return Job()


def test_port_for_job_is_stable_and_in_range():
    assert port_for_job("123") == port_for_job("123")
    assert port_for_job("123_0") != port_for_job("123_1")
    assert all(20000 <= port_for_job(str(i)) < 40000 for i in range(200))


def standin_run(cfg, env):
    """Stand-in trainer for the SLURM-path tests: records what it saw, in a pickle-free JSON file."""
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    seen = dict(rank=env.rank, world=env.world_size, local_rank=env.local_rank, master=env.master_addr,
                port=env.master_port, env_rank=os.environ["RANK"], env_world=os.environ["WORLD_SIZE"],
                lr=cfg.optim.lr, resume=cfg.train.resume)
    with open(run_dir / f"seen_rank{env.rank}.json", "a") as f:
        f.write(json.dumps(seen) + "\n")
    preempt_once = os.environ.get("STANDIN_PREEMPT_ONCE")
    if preempt_once and not (run_dir / "preempted").exists():
        if env.rank == 0:
            # The requeue kills every task: let the others record what they saw first.
            deadline = time.time() + 60
            while time.time() < deadline and not all(
                (run_dir / f"seen_rank{r}.json").exists() for r in range(env.world_size)
            ):
                time.sleep(0.05)
            (run_dir / "preempted").touch()
        return SimpleNamespace(status="preempted", step=3, run_dir=run_dir)
    return SimpleNamespace(status="finished", step=cfg.train.steps, run_dir=run_dir)


def test_debug_executor_runs_the_task_in_process(tmp_path):
    cfg = resolve_runs(str(write_config(tmp_path)), [], []).configs[0]
    job = submitit.DebugExecutor(tmp_path / "dbg").submit(TrainTask(cfg, target="tests.launch.test_launch:standin_run"))
    assert job.result().status == "finished"
    seen = json.loads((cfg.run.dir / "seen_rank0.json").read_text())
    assert (seen["rank"], seen["world"], seen["env_rank"], seen["env_world"]) == (0, 1, "0", "1")


# ---------------------------------------------------------------- fake SLURM, real submitit path


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """fake sbatch/srun/sacct/scancel/scontrol first on PATH; kills whatever they started."""
    state = tmp_path / "slurm_state"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    monkeypatch.setenv("FAKE_SLURM_PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield state
    fakeslurm.kill_all(state)


def test_slurm_array_sweep_with_requeue_through_fake_slurm(tmp_path, capsys, fake_slurm, monkeypatch):
    monkeypatch.setenv("STANDIN_PREEMPT_ONCE", "1")  # every member is preempted once, then requeued
    cfg = write_config(tmp_path)
    code, out, err = run_cli(
        ["slurm", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--partition", "p",
         "--time", "1:00:00", "--target", "tests.launch.test_launch:standin_run", "train.resume=null", "--sweep", "optim.lr=0.1,0.2"],
        capsys,
    )
    assert code == 0, err
    ids = re.findall(r"submitted job (\S+): run (\S+)", out)
    assert [i for i, _ in ids] == ["1001_0", "1001_1"]
    for job_id, run_dir in ids:
        assert fakeslurm.wait_state(fake_slurm, job_id, {"COMPLETED", "FAILED"}, 120) == "COMPLETED"
        assert (fake_slurm / f"{job_id}.runs").read_text() == "2"  # preempted, requeued, finished
        seen = [json.loads(x) for r in (0, 1) for x in (Path(run_dir) / f"seen_rank{r}.json").read_text().splitlines()]
        assert sorted((s["rank"], s["world"]) for s in seen) == [(0, 2), (0, 2), (1, 2), (1, 2)]
        assert len({(s["master"], s["port"]) for s in seen}) == 1  # one rendezvous, same after requeue
        assert [s["resume"] for s in seen if s["rank"] == 0] == [None, "auto"]  # requeue resumes
        assert {s["lr"] for s in seen} == {0.1 if job_id.endswith("_0") else 0.2}
        st = run_status(Path(run_dir))
        assert [(j.job_id, j.state) for j in st.jobs] == [(job_id, "COMPLETED")]
        assert "trainer returned finished at step 10" in format_status(st)
        job = submitit.SlurmJob(folder=st.jobs[0].log.parent, job_id=job_id)
        assert job.result().status == "finished"


def test_status_reads_the_folder_when_sacct_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    run_dir = tmp_path / "runs" / "r"
    folder = run_dir / "slurm" / "77"
    folder.mkdir(parents=True)
    (folder / "77_0_log.out").write_text("started\n")
    add_record(run_dir, "77", "slurm", folder)
    (run_dir / "jobs.jsonl").open("a").write("not json\n")
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_0000040").mkdir(parents=True)
    (ckpts / "latest").write_text("step_0000040\n")
    st = run_status(run_dir)
    assert [(j.job_id, j.state) for j in st.jobs] == [("77", "STARTED")]
    assert st.checkpoint.name == "step_0000040" and st.checkpoint_step == 40
    assert len(st.problems) == 1 and "unreadable job record" in st.problems[0]
    submitit.core.utils.cloudpickle_dump(("error", "Traceback...\nValueError: boom"), folder / "77_0_result.pkl")
    assert run_status(run_dir).jobs[0].state == "FAILED" and "boom" in run_status(run_dir).jobs[0].detail
    (ckpts / "latest").write_text("step_0000099\n")  # dangling pointer: reported, not a crash
    assert "not a checkpoint folder" in format_status(run_status(run_dir))
    assert len(read_records(run_dir)[0]) == 1


def test_multi_node_rendezvous_comes_from_the_slurm_environment(monkeypatch):
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in dict(SLURM_JOB_ID="55", SLURM_NTASKS="8", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1",
                     SLURM_JOB_NODELIST="gpu[03-04]", SLURM_PROCID="5", SLURM_LOCALID="1").items():
        monkeypatch.setenv(k, v)
    env = job_dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher) == ("gpu03", port_for_job("55"), "slurm")
