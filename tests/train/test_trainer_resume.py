"""Kill ``python -m train`` with SIGKILL (inside a step, inside checkpoint writes, between
checkpoints), resume, and get the bit-identical weights of an uninterrupted run — with every
switch that draws randomness on: patch dropout, augmentation, random caption sampling,
loader workers, accumulation, both losses, shards and synthetic sources, 1 and 2 ranks."""

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


RANDOM = {"model": {"patch_dropout": 0.5}, "train": {"accum_steps": 2}}
"""Switches that draw randomness (augmentation and random captions are on by default)."""
SIGLIP = {"loss": {"kind": "siglip"}, "model": {"patch_dropout": 0.5, "init_logit_bias": -10.0}}


def write_config(path: Path, data: dict, extra: dict | None = None) -> Path:
    extra = extra or {}
    base = {
        "run": {"root": str(path.parent), "name": "unused"},
        "model": {"name": "orbit-micro", **extra.get("model", {})},
        "data": {"batch_size": 8, "synthetic_samples": 64, "synthetic_image_size": 32,
                 "caption_sampling": "random", **data},
        "loss": extra.get("loss", {"kind": "clip"}),
        "optim": {"warmup_steps": 2},
        # Bit-identical resume is checked in fp32 unless a test asks for `auto` (both answers).
        "train": {"steps": STEPS, "checkpoint_every": 3, "log_every": 1, "progress": False, "precision": "fp32",
                  **extra.get("train", {})},
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


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, cpu_bf16):
    """In fp32 and, on a CPU with native bf16, in bf16 autocast (``auto``): bit-identical in both."""
    extra = {**RANDOM, "train": {**RANDOM["train"], "precision": "auto"}}
    config = write_config(tmp_path / "cfg.yaml", {"source": "synthetic", "workers": 0}, extra)
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
    assert "resumed from" in err and f"precision {cpu_bf16} (auto: " in err
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


@pytest.mark.parametrize("workers, extra", [(1, {**RANDOM, "train": {"accum_steps": 1}}), (2, SIGLIP)],
                         ids=["clip-1worker", "siglip-2workers"])
def test_shards_with_workers_sigkill_resume_is_bit_identical(tmp_path, tiny_shards, workers, extra):
    """The issue's case: patch dropout, shards, a loader worker — killed right after a checkpoint."""
    config = write_config(tmp_path / "cfg.yaml", {
        "source": "shards", "workers": workers, "shuffle_buffer": 16, "prefetch_factor": 2,
        "shards": [{"path": str(tiny_shards), "split": "train"}],
    }, extra)
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    baseline = start(config, base_dir)
    kill_at_step(start(config, run_dir), 5)
    assert latest(run_dir) in {"step_0000003", "step_0000006"}
    finish(start(config, run_dir), 0)
    finish(baseline, 0)
    assert_same_weights(run_dir, base_dir)


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (torchrun's workers run in sessions of their own)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return sorted(kids)


def start_two_ranks(config: Path, run_dir: Path, steps: int) -> subprocess.Popen:
    from tests.distutil import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(ABORT_ENV, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "train", "--config", str(config), f"run.root={run_dir.parent}", f"run.name={run_dir.name}",
           f"train.steps={steps}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_two_ranks_sigkill_inside_a_step_then_resume_is_bit_identical(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", {"source": "synthetic", "workers": 0, "batch_size": 4}, SIGLIP)
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    steps = 60
    baseline = start_two_ranks(config, base_dir, steps)
    proc = start_two_ranks(config, run_dir, steps)
    for line in proc.stderr:  # one rank dies by SIGKILL mid-step (a lost node); torchrun ends the job
        if (m := re.search(rf"step (\d+)/{steps}\b", line)) and int(m.group(1)) >= 7:
            os.kill(_children(proc.pid)[-1], signal.SIGKILL)
            break
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    killed_at = int(latest(run_dir).split("_")[1])
    assert 6 <= killed_at < steps, killed_at
    finish(start_two_ranks(config, run_dir, steps), 0)
    finish(baseline, 0)
    assert_same_weights(run_dir, base_dir)


_FAIL_RANK0 = '''
import os
if os.environ.get("RANK") == "0":
    import eval.registry as registry

    real_get = registry.get

    def get(name):
        ev = real_get(name)

        def fail(ctx, opts):
            raise RuntimeError("injected evaluator failure on rank 0")
            yield

        return registry.Evaluator(ev.name, ev.options, fail, ev.needs_labels, ev.needs_captions)

    registry.get = get
'''


@pytest.mark.slow
def test_an_evaluator_failing_on_one_rank_ends_every_rank_promptly(tmp_path):
    import time

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(_FAIL_RANK0)
    config = write_config(tmp_path / "cfg.yaml", {"source": "synthetic", "workers": 0, "batch_size": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path / 'inject'}:{ROOT}"}
    from tests.distutil import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "train", "--config", str(config), f"run.root={tmp_path}", "run.name=r", "train.steps=4",
           "eval.every=2", "eval.benchmarks=[demo]"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "evaluation at step 2 failed on rank(s) [0]: rank 0: RuntimeError: injected evaluator failure" in proc.stderr
    assert proc.stderr.count("injected evaluator failure on rank 0") >= 2  # both ranks say why
    assert elapsed < 120, elapsed  # seconds of start-up and two steps, not an NCCL/gloo timeout (30 min)
