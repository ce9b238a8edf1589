"""The GPU check's CPU smoke: every stage of ``benchmarks/run_gpu.sh`` at tiny size, through the
same code a GPU runs, one JSON per stage; a stage stopped midway keeps the others' results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT as ROOT

SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"


def stage_names(group: str) -> list[str]:
    """The stages a group expands to, read from the script itself."""
    m = re.search(rf"STAGES=\$\{{STAGES//{group}/([^}}]+)\}}", SCRIPT.read_text())
    assert m, f"group {group} not found in run_gpu.sh"
    return m.group(1).split()


def smoke(out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def payload(out: Path, stage: str) -> dict:
    return json.loads((out / f"{stage}.json").read_text())


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_leaves_one_json_each(tmp_path):
    stages = stage_names("A") + stage_names("B")
    assert len(stages) >= 6
    proc = smoke(tmp_path, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for stage in stages:
        p = payload(tmp_path, stage)
        assert p["status"] == "complete" and p["rows"], stage
        assert "cpu" in p["machine"], stage
        bad = [r for r in p["rows"] if str(r.get("status", "ok")) not in ("ok",) and not
               str(r.get("status")).startswith(("SIGKILLed", "skipped"))]
        assert not bad, f"{stage}: {bad}"
    # What each stage checks, not just that it ran.
    accum = {r["run"]: r for r in payload(tmp_path, "train_accum")["rows"]}
    assert accum["accum1"]["loss_fell"] and accum["accum 4 vs 1 (weights)"]["rel_diff"] <= 1e-5
    resume = {r["run"]: r for r in payload(tmp_path, "train_resume")["rows"]}
    assert resume["killed"]["status"] == "SIGKILLed" and resume["resumed vs uninterrupted (weights)"]["bitwise"]
    assert {r.get("zero_stage") for r in payload(tmp_path, "train_zero")["rows"]} >= {1, 2, 3} or \
        payload(tmp_path, "train_zero")["rows"][0]["status"].startswith("skipped")
    modes = {r["mode"] for r in payload(tmp_path, "train_throughput")["rows"]}
    assert {"e2e", "breakdown", "open_clip_train e2e"} <= modes


@pytest.mark.slow
def test_a_stage_killed_by_its_time_limit_keeps_the_other_stages(tmp_path):
    # Steps enough that no machine finishes the stage within its limit, whatever its speed.
    proc = smoke(tmp_path, timeout=600, STAGES="train_resume data_throughput", LIMIT_train_resume="25",
                 ARGS_train_resume="--steps 1000000")
    assert proc.returncode != 0
    assert "train_resume FAILED (rc=124, time limit)" in proc.stdout
    killed = payload(tmp_path, "train_resume")
    assert killed["status"] == "running"  # stopped midway: what it finished is there, marked unfinished
    assert payload(tmp_path, "data_throughput")["status"] == "complete"
