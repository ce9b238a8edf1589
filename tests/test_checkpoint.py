"""CheckpointManager: atomic publication, pruning, crash debris, resume resolution, RNG state."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distutil import run_distributed
from train.checkpoint import (
    ABORT_ENV, CheckpointManager, gather_objects, rng_state, set_rng_state, step_dir_name,
)
from train.distenv import DistEnv

ROOT = Path(__file__).resolve().parents[1]


class FileEngine:
    """Writes one file per rank, then a DONE marker last (so partial folders are detectable)."""

    def __init__(self, rank: int = 0, delay: float = 0.0):
        self.rank, self.delay = rank, delay

    def save_checkpoint(self, path_dir: str, extra: dict) -> None:
        path = Path(path_dir)
        assert path.is_dir() and not (path / f"rank{self.rank}.pt").exists()
        torch.save(extra, path / f"rank{self.rank}.pt")
        time.sleep(self.delay)
        (path / f"DONE{self.rank}").write_text("ok")


def _complete(folder: Path, world: int = 1) -> bool:
    return all((folder / f"DONE{r}").is_file() for r in range(world))


def test_save_publishes_and_prunes(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=2, env=DistEnv())
    assert mgr.latest() is None and mgr.resolve("auto") is None
    for step in (3, 6, 9):
        final = mgr.save(FileEngine(), step, {"step": step})
        assert final.name == step_dir_name(step) == f"step_{step:07d}"
    names = sorted(p.name for p in mgr.root.iterdir())
    assert names == ["latest", "step_0000006", "step_0000009"]
    assert (mgr.root / "latest").read_text().strip() == "step_0000009"
    assert mgr.latest() == mgr.root / "step_0000009"
    assert torch.load(mgr.latest() / "rank0.pt")["step"] == 9
    with pytest.raises(ValueError, match="keep_checkpoints"):
        CheckpointManager(tmp_path, keep=0, env=DistEnv())


def test_resolve_paths(tmp_path):
    run_dir = tmp_path / "run"
    mgr = CheckpointManager(run_dir / "checkpoints", keep=3, env=DistEnv())
    mgr.save(FileEngine(), 4, {})
    mgr.save(FileEngine(), 8, {})
    step8 = run_dir / "checkpoints" / "step_0000008"
    assert mgr.resolve(None) is None
    assert mgr.resolve("auto") == step8
    assert mgr.resolve(str(run_dir)) == step8  # a run directory means its latest
    assert mgr.resolve(str(run_dir / "checkpoints")) == step8
    assert mgr.resolve(str(run_dir / "checkpoints" / "step_0000004")).name == "step_0000004"
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        mgr.resolve(str(tmp_path / "nope"))
    import shutil

    shutil.rmtree(step8)  # someone deleted the folder by hand: say so, don't start from scratch
    with pytest.raises(FileNotFoundError, match="step_0000008"):
        mgr.resolve("auto")


_SAVER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_checkpoint import FileEngine
from train.checkpoint import CheckpointManager
from train.distenv import DistEnv
mgr = CheckpointManager({ckpt!r}, keep=2, env=DistEnv())
for step in range(1, {steps} + 1):
    mgr.save(FileEngine(delay={delay}), step, {{"step": step}})
    print(step, flush=True)
"""


def _saver(ckpt: Path, steps: int, delay: float, env: dict | None = None) -> subprocess.Popen:
    code = _SAVER.format(root=str(ROOT), ckpt=str(ckpt), steps=steps, delay=delay)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("phase", ["written", "renamed"])
def test_abort_inside_save_leaves_previous_latest(tmp_path, phase):
    ckpt = tmp_path / "checkpoints"
    proc = _saver(ckpt, 5, 0.0, {ABORT_ENV: f"3:{phase}"})
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    mgr = CheckpointManager(ckpt, keep=2, env=DistEnv())
    assert mgr.latest() == ckpt / "step_0000002" and _complete(mgr.latest())
    debris = ckpt / (".tmp-step_0000003" if phase == "written" else "step_0000003")
    assert debris.is_dir()  # the interrupted save, never pointed to
    # Resuming and saving the same step again replaces the debris.
    mgr.save(FileEngine(), 3, {"step": 3})
    assert mgr.latest() == ckpt / "step_0000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000002", "step_0000003"]


def test_sigkill_at_random_moments_never_breaks_latest(tmp_path):
    rng = random.Random(1234)
    for trial in range(2):
        ckpt = tmp_path / f"c{trial}" / "checkpoints"
        proc = _saver(ckpt, 1000, 0.05)
        assert proc.stdout.readline().strip() == "1"  # at least one checkpoint done
        time.sleep(rng.uniform(0.0, 0.3))  # then somewhere inside a later save
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        latest = CheckpointManager(ckpt, keep=2, env=DistEnv()).latest()
        assert latest is not None and _complete(latest), trial
        assert torch.load(latest / "rank0.pt")["step"] == int(latest.name.split("_")[1])


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def _two_rank_save(rank: int, world: int, ckpt: str) -> dict:
    env = DistEnv(rank=rank, world_size=world)
    gathered = gather_objects({"rank": rank, "rng": rng_state()}, env)
    mgr = CheckpointManager(ckpt, keep=1, env=env)
    for step in (1, 2):
        mgr.save(FileEngine(rank=rank, delay=0.2 * (1 - rank)), step, {"step": step})
    return {"ranks": [g["rank"] for g in gathered], "latest": str(mgr.latest())}


def test_two_ranks_publish_only_complete_folders(tmp_path):
    ckpt = tmp_path / "checkpoints"
    out = run_distributed(_two_rank_save, 2, str(ckpt), timeout=120)
    assert [o["ranks"] for o in out] == [[0, 1], [0, 1]]
    assert {o["latest"] for o in out} == {str(ckpt / "step_0000002")}
    # Rank 0 renamed only after the slower rank had written (barrier before rename).
    assert _complete(ckpt / "step_0000002", world=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000002"]
