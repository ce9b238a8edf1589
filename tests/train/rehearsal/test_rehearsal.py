"""The CUDA rehearsal: the training step, the losses and the gather on a fake CUDA device.

Each test reads one scenario of a ``rehearse.py`` subprocess (the fake device needs a C++
shim loaded before torch, so it cannot run in this process); the scenarios share one
process to keep the suite fast. What the fake device cannot run is reported as a skip
with the error that shows it; DESIGN.md ("CUDA rehearsal") says what only a GPU shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import REPO_ROOT
from tests.train.rehearsal.shim import ShimUnavailable, build

pytestmark = pytest.mark.cuda_rehearsal

SCRIPT = Path(__file__).with_name("rehearse.py")
RUNS = ["ddp-step-accum1", "ddp-step-accum4", "losses-world8", "rng-capture"]
UNSUPPORTED = ["host-reads", "ddp-wrapper", "pin-memory", "broadcast"]


@pytest.fixture(scope="module")
def shim() -> Path:
    try:
        return build()
    except ShimUnavailable as e:
        pytest.skip(f"CUDA rehearsal unavailable: {e}")


def rehearse(shim: Path, *args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    """Run ``rehearse.py`` with ``args``; (exit status, records by scenario, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--shim", str(shim), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    records = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            records[record["scenario"]] = record
    return done.returncode, records, done.stderr


@pytest.fixture(scope="module")
def rehearsal(shim: Path) -> dict[str, dict[str, Any]]:
    _, records, stderr = rehearse(shim, *RUNS, *UNSUPPORTED)
    missing = [s for s in RUNS + UNSUPPORTED if s not in records]
    assert not missing, f"rehearsal died before {missing}:\n{stderr[-4000:]}"
    return records


@pytest.mark.parametrize("scenario", RUNS)
def test_scenario_runs_on_the_fake_cuda_device(rehearsal, scenario):
    record = rehearsal[scenario]
    assert record["status"] == "ok", f"{scenario}: {record.get('error')}\n{record['detail']}"
    assert "cuda" in record["detail"]


@pytest.mark.parametrize("scenario", UNSUPPORTED)
def test_piece_the_fake_device_cannot_run(rehearsal, scenario):
    record = rehearsal[scenario]
    if record["status"] == "skip":
        pytest.skip(f"{scenario}: {record['detail']}")
    assert record["status"] == "ok", f"{scenario}: {record.get('error')}\n{record['detail']}"


def test_rehearsal_catches_a_cpu_tensor_meeting_a_cuda_one(shim):
    status, records, stderr = rehearse(shim, "--bug", "cpu-texts", "ddp-step-accum1")
    record = records.get("ddp-step-accum1")
    assert record is not None, stderr[-4000:]
    assert status == 1 and record["status"] == "fail"
    assert record["error"] == "FakeTensorDeviceMismatchError", record["detail"]
    assert "cuda:0 and cpu" in record["detail"]


def test_without_gxx_the_rehearsal_is_unavailable(monkeypatch):
    import tests.train.rehearsal.shim as shim_mod

    monkeypatch.setattr(shim_mod.shutil, "which", lambda _name: None)
    with pytest.raises(ShimUnavailable, match="g\\+\\+ is not on PATH"):
        shim_mod.build()


def test_an_edited_shim_source_is_rebuilt(monkeypatch, tmp_path):
    import tests.train.rehearsal.shim as shim_mod

    compiled: list[str] = []

    def fake_compile(cmd: list[str], **_: Any) -> subprocess.CompletedProcess:
        Path(cmd[-1]).write_bytes(b"lib")
        compiled.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    source = tmp_path / "fake_cuda.cpp"
    source.write_text(shim_mod.SOURCE.read_text())
    monkeypatch.setattr(shim_mod, "SOURCE", source)
    monkeypatch.setattr(shim_mod, "BUILD_DIR", tmp_path / "build")
    monkeypatch.setattr(shim_mod.subprocess, "run", fake_compile)
    first = shim_mod.build()
    assert shim_mod.build() == first and len(compiled) == 1  # cached
    source.write_text(source.read_text() + "// edited\n")
    second = shim_mod.build()
    assert second != first and second.is_file() and len(compiled) == 2
