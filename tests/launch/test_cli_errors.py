"""``python -m launch`` turns user errors into one line on stderr and a non-zero exit, never a traceback,
including bad input the trainer finds inside a job; a bug in a job still shows its traceback."""

from __future__ import annotations

import re

import pytest

from launch.status import format_status, run_status
from tests.cliutil import run_cli_cases
from tests.launch.test_launch import write_config
from train.api import ConfigError, load_config


def standin_bad_input(cfg, env):
    """Stand-in trainer that rejects its config, as the trainer does (e.g. a checkpoint's world size)."""
    raise ConfigError(f"checkpoint was written by 2 ranks, this run has {env.world_size}")


def standin_bug(cfg, env):
    """Stand-in trainer with a programming error."""
    return 1 / 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch_cli")
    cfg = str(write_config(tmp))
    (tmp / "bad.yaml").write_text("run: [\n")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00 run")
    (tmp / "not_a_run").mkdir()
    slurm = ["slurm", "--config", cfg, "--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--dry-run"]
    cases = {
        "missing_config": ["local", "--config", str(tmp / "missing.yaml")],
        "config_typo": ["local", "--config", cfg, "optim.lrr=1"],
        "bad_yaml": ["local", "--config", str(tmp / "bad.yaml")],
        "binary_config": ["local", "--config", str(tmp / "binary.yaml")],
        "bad_override": ["local", "--config", cfg, "optim.betas=[0.9,"],
        "status_missing": ["status", str(tmp / "absent")],
        "status_not_a_run": ["status", str(tmp / "not_a_run")],
        "slurm_time": [*slurm, "--time", "1:00"],
    }
    return tmp, run_cli_cases("launch", cases)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Two real ``launch local`` jobs (LocalExecutor processes) whose stand-in trainer fails."""
    tmp = tmp_path_factory.mktemp("launch_jobs")
    local = ["local", "--config", str(write_config(tmp)), "train.resume=null"]
    cases = {
        "trainer_bad_input": [*local, "run.name=bad", "--target", f"{__name__}:standin_bad_input"],
        "trainer_bug": [*local, "run.name=bug", "--target", f"{__name__}:standin_bug"],
    }
    return tmp, run_cli_cases("launch", cases)


def _load_error(path, overrides=()) -> str:
    """The message train.api.load_config gives (its wording is train's)."""
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def _expected(tmp) -> dict[str, str]:
    return {
        "missing_config": f"error: {_load_error(tmp / 'missing.yaml')}",
        "config_typo": f"error: {_load_error(tmp / 'demo.yaml', ['optim.lrr=1'])}",
        "bad_yaml": f"error: {tmp}/bad.yaml: invalid YAML at line 2, column 1: "
                    "expected the node content, but found '<stream end>'",
        "binary_config": f"error: {tmp}/binary.yaml: not UTF-8 text (invalid start byte at byte 0)",
        "bad_override": "error: override 'optim.betas=[0.9,': the value is not valid YAML "
                        "(expected the node content, but found '<stream end>')",
        "status_missing": f"error: run directory not found: {tmp}/absent",
        "status_not_a_run": f"error: {tmp}/not_a_run is not a run directory "
                            "(none of jobs.jsonl, config.yaml, checkpoints, tb in it)",
        "slurm_time": "error: --signal-delay-s 120 is not shorter than --time 1:00",
    }


@pytest.mark.parametrize("case", ["missing_config", "config_typo", "bad_yaml", "binary_config", "bad_override",
                                  "status_missing", "status_not_a_run", "slurm_time"])
def test_user_error_is_one_line_and_exit_code_2(setup, case):
    tmp, runs = setup
    got = runs[case]
    assert "Traceback" not in got.stderr
    assert got.error_lines == [_expected(tmp)[case]]
    assert got.code == 2 and got.stdout == ""  # nothing half-printed before the error


@pytest.mark.slow
def test_bad_input_found_by_the_trainer_in_the_job_is_one_line(jobs):
    tmp, runs = jobs
    got = runs["trainer_bad_input"]
    assert "Traceback" not in got.stderr and got.code == 2
    [line] = got.error_lines
    assert re.fullmatch(rf"error: run {tmp}/runs/bad: ConfigError: checkpoint was written by 2 ranks, "
                        rf"this run has 1 \(log: {tmp}/runs/bad/local/\d+_0_log\.err\)", line), line
    log = line.split("(log: ")[1][:-1]
    assert "Traceback" in open(log).read()  # the whole story is in the job's log
    # and status says the same thing in its job line
    assert "FAILED - ConfigError: checkpoint was written by 2 ranks" in format_status(run_status(tmp / "runs" / "bad"))


@pytest.mark.slow
def test_a_bug_in_the_job_still_shows_its_traceback(jobs):
    tmp, runs = jobs
    got = runs["trainer_bug"]
    assert got.code == 1
    assert got.stderr.startswith(f"run {tmp}/runs/bug failed:\n")
    assert "Traceback" in got.stderr and "ZeroDivisionError: division by zero" in got.stderr
