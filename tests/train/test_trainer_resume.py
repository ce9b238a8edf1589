"""Kill ``python -m train`` with SIGKILL (also inside checkpoint writes), resume, and get the
bit-identical weights of an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from train.loop.checkpoint import ABORT_ENV

from tests import REPO_ROOT as ROOT
STEPS = 16
STEP_LINE = re.compile(rf"step (\d+)/{STEPS}\b")


def write_config(path: Path, data: dict) -> Path:
    base = {
        "run": {"root": str(path.parent), "name": "unused"},
        "model": {"name": "orbit-micro"},
        "data": {"batch_size": 8, "synthetic_samples": 64, "synthetic_image_size": 32, **data},
        "optim": {"warmup_steps": 2},
        "train": {"steps": STEPS, "checkpoint_every": 3, "log_every": 1, "progress": False},
    }
    path.write_text(yaml.safe_dump(base))
    return path


def start(config: Path, run_dir: Path, abort: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(ABORT_ENV, None)
    if abort:
        env[ABORT_ENV] = abort
    cmd = [sys.executable, "-m", "train", "--config", str(config),
           f"run.root={run_dir.parent}", f"run.name={run_dir.name}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, expect_rc: int) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == expect_rc, f"rc {proc.returncode}\n{err[-3000:]}"
    return err


def kill_at_step(proc: subprocess.Popen, step: int) -> int:
    """SIGKILL the run as soon as its log reports a step >= ``step``; returns that step."""
    for line in proc.stderr:
        m = STEP_LINE.search(line)
        if m and int(m.group(1)) >= step:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
            return int(m.group(1))
    raise AssertionError(f"run ended (rc {proc.wait()}) before step {step}")


def latest(run_dir: Path) -> str:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    folder = run_dir / "checkpoints" / name
    assert all((folder / f).is_file() for f in ("model.pt", "optimizer.pt", "extra.pt")), f"{folder} incomplete"
    return name


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", {"source": "synthetic", "workers": 0})
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    baseline = start(config, base_dir)  # runs alongside the interrupted chain
    # 1) killed after checkpoint 6 is written but before it is renamed: latest stays at 3.
    finish(start(config, run_dir, abort="6:written"), -signal.SIGKILL)
    assert latest(run_dir) == "step_0000003"
    # 2) resumed, killed after checkpoint 9 is renamed but before `latest` moves: latest stays at 6.
    finish(start(config, run_dir, abort="9:renamed"), -signal.SIGKILL)
    assert latest(run_dir) == "step_0000006"
    # 3) resumed from 6, killed by SIGKILL somewhere after step 8.
    kill_at_step(start(config, run_dir), 8)
    assert latest(run_dir) in {f"step_{s:07d}" for s in (6, 9, 12, 15)}
    # 4) resumed to the end.
    err = finish(start(config, run_dir), 0)
    assert "resumed from" in err
    finish(baseline, 0)
    assert latest(run_dir) == latest(base_dir) == f"step_{STEPS:07d}"
    assert_same_weights(run_dir, base_dir)


def test_sigterm_via_cli_preempts_with_exit_0(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", {"source": "synthetic", "workers": 0})
    run_dir = tmp_path / "run"
    proc = start(config, run_dir)
    for line in proc.stderr:
        if (m := STEP_LINE.search(line)) and int(m.group(1)) >= 4:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert '"status": "preempted"' in out
    step = int(re.search(r'"step": (\d+)', out).group(1))
    assert 4 <= step < STEPS and latest(run_dir) == f"step_{step:07d}"


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from shards.api import build

    out = tmp_path_factory.mktemp("shards") / "syn"
    build("synthetic", None, out, count=240, image_size=32, shard_size=24, progress=False, workers=1)
    return out


def test_shards_with_workers_sigkill_resume_is_bit_identical(tmp_path, tiny_shards):
    config = write_config(tmp_path / "cfg.yaml", {
        "source": "shards", "workers": 2, "shuffle_buffer": 16, "prefetch_factor": 2,
        "shards": [{"path": str(tiny_shards), "split": "train"}],
    })
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    baseline = start(config, base_dir)
    kill_at_step(start(config, run_dir), 5)
    assert latest(run_dir) in {"step_0000003", "step_0000006"}
    finish(start(config, run_dir), 0)
    finish(baseline, 0)
    assert_same_weights(run_dir, base_dir)
