"""CheckpointManager: atomic and durable publication, manifests, pruning, crash debris, resume resolution."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distutil import run_distributed
from train.core.collectives import Comm
from train.core.distenv import DistEnv
from train.core.rng import capture_process, restore_process
from train.core.rundir import RunDir, step_name
from train.loop.checkpoint import ABORT_ENV, CheckpointError, CheckpointManager

from tests import REPO_ROOT as ROOT


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


def _mgr(run_dir: Path, keep: int = 2, env: DistEnv | None = None) -> CheckpointManager:
    return CheckpointManager(RunDir(run_dir), keep, Comm(env or DistEnv()))


def test_save_publishes_and_prunes(tmp_path):
    mgr = _mgr(tmp_path)
    assert mgr.run.latest() is None and mgr.resolve("auto") is None
    for step in (3, 6, 9):
        final = mgr.save(FileEngine(), step, {"step": step})
        assert final.path.name == step_name(step) == f"step_{step:07d}" and final.step == step
    names = sorted(p.name for p in mgr.run.checkpoints.iterdir())
    assert names == ["latest", "step_0000006", "step_0000009"]
    assert mgr.run.latest_pointer.read_text().strip() == "step_0000009"
    assert mgr.run.latest().path == mgr.run.checkpoints / "step_0000009"
    assert torch.load(mgr.run.latest().path / "rank0.pt")["step"] == 9
    manifest = json.loads(mgr.run.latest().manifest.read_text())
    assert set(manifest["files"]) == {"rank0.pt", "DONE0"} and manifest["step"] == 9
    with pytest.raises(ValueError, match="keep_checkpoints"):
        _mgr(tmp_path, keep=0)


def test_resolve_paths(tmp_path, caplog):
    run_dir = tmp_path / "run"
    mgr = _mgr(run_dir, keep=3)
    mgr.save(FileEngine(), 4, {})
    mgr.save(FileEngine(), 8, {})
    step4, step8 = run_dir / "checkpoints" / "step_0000004", run_dir / "checkpoints" / "step_0000008"
    assert mgr.resolve(None) is None
    assert mgr.resolve("auto").path == step8
    assert mgr.resolve(str(run_dir)).path == step8  # a run directory means its latest
    assert mgr.resolve(str(run_dir / "checkpoints")).path == step8
    assert mgr.resolve(str(step4)).path == step4
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        mgr.resolve(str(tmp_path / "nope"))
    shutil.rmtree(step8)  # someone deleted the folder by hand: say so, use the one before
    with caplog.at_level("WARNING", logger="train"):
        assert mgr.resolve("auto").path == step4
    assert "step_0000008" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog, damage):
    mgr = _mgr(tmp_path, keep=3)
    for step in (1, 2):
        mgr.save(FileEngine(), step, {"step": step, "payload": torch.arange(1000)})
    victim = mgr.run.checkpoint(2).path / "rank0.pt"
    data = victim.read_bytes()
    if damage == "truncate":  # what a machine crash leaves of unsynced data
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        victim.unlink()
    with caplog.at_level("WARNING", logger="train"):
        assert mgr.resolve("auto").path == mgr.run.checkpoint(1).path
    assert "step_0000002 is unusable" in caplog.text and "rank0.pt" in caplog.text
    # Explicitly asking for the damaged one is an error, not a silent fallback.
    with pytest.raises(CheckpointError, match="rank0.pt"):
        mgr.resolve(str(mgr.run.checkpoint(2).path))
    # Nothing usable at all: a clear error instead of training from scratch.
    (mgr.run.checkpoint(1).path / "rank0.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        mgr.resolve("auto")


def test_files_are_synced_before_they_are_published(tmp_path, monkeypatch):
    """fsync of every file and folder happens before the rename, and of the parent after it."""
    import train.core.files as files
    import train.loop.checkpoint as ck

    events: list[tuple[str, str]] = []
    real_rename = os.rename
    monkeypatch.setattr(files, "fsync_file", lambda p: events.append(("fsync", str(p))))
    monkeypatch.setattr(ck, "fsync_dir", lambda p: events.append(("fsync", str(p))))
    monkeypatch.setattr(files, "fsync_dir", lambda p: events.append(("fsync", str(p))))
    monkeypatch.setattr(ck.os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b)))
    mgr = _mgr(tmp_path)
    mgr.save(FileEngine(), 1, {"step": 1})
    tmp = str(mgr.run.temp_checkpoint(1).path)
    rename = events.index(("rename", str(mgr.run.checkpoint(1).path)))
    synced_before = {p for e, p in events[:rename] if e == "fsync"}
    assert {f"{tmp}/rank0.pt", f"{tmp}/DONE0", tmp} <= synced_before
    assert any("MANIFEST.json" in p for p in synced_before)
    assert ("fsync", str(mgr.run.checkpoints)) in events[rename:]  # the rename itself is made durable


_SAVER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.train.loop.test_checkpoint import FileEngine, _mgr
from pathlib import Path
mgr = _mgr(Path({run!r}), keep=2)
for step in range(1, {steps} + 1):
    mgr.save(FileEngine(delay={delay}), step, {{"step": step}})
    print(step, flush=True)
"""


def _saver(run: Path, steps: int, delay: float, env: dict | None = None) -> subprocess.Popen:
    code = _SAVER.format(root=str(ROOT), run=str(run), steps=steps, delay=delay)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("phase", ["written", "renamed"])
def test_abort_inside_save_leaves_previous_latest(tmp_path, phase):
    proc = _saver(tmp_path, 5, 0.0, {ABORT_ENV: f"3:{phase}"})
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    mgr = _mgr(tmp_path)
    ckpt = mgr.run.checkpoints
    assert mgr.run.latest().path == ckpt / "step_0000002" and _complete(mgr.run.latest().path)
    debris = ckpt / (".tmp-step_0000003" if phase == "written" else "step_0000003")
    assert debris.is_dir()  # the interrupted save, never pointed to
    # Resuming and saving the same step again replaces the debris.
    mgr.save(FileEngine(), 3, {"step": 3})
    assert mgr.run.latest().path == ckpt / "step_0000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000002", "step_0000003"]


def test_sigkill_at_random_moments_never_breaks_latest(tmp_path):
    rng = random.Random(1234)
    for trial in range(2):
        run = tmp_path / f"c{trial}"
        proc = _saver(run, 1000, 0.05)
        assert proc.stdout.readline().strip() == "1"  # at least one checkpoint done
        time.sleep(rng.uniform(0.0, 0.3))  # then somewhere inside a later save
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        latest = _mgr(run).resolve("auto")
        assert latest is not None and _complete(latest.path), trial
        assert torch.load(latest.path / "rank0.pt")["step"] == latest.step


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_process()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_process(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def _two_rank_save(rank: int, world: int, run: str) -> dict:
    env = DistEnv(rank=rank, world_size=world)
    comm = Comm(env)
    gathered = comm.all_gather_object({"rank": rank, "rng": capture_process()})
    mgr = CheckpointManager(RunDir(Path(run)), 1, comm)
    for step in (1, 2):
        mgr.save(FileEngine(rank=rank, delay=0.2 * (1 - rank)), step, {"step": step})
    return {"ranks": [g["rank"] for g in gathered], "latest": str(mgr.run.latest().path)}


def test_two_ranks_publish_only_complete_folders(tmp_path):
    out = run_distributed(_two_rank_save, 2, str(tmp_path), timeout=120)
    ckpt = tmp_path / "checkpoints"
    assert [o["ranks"] for o in out] == [[0, 1], [0, 1]]
    assert {o["latest"] for o in out} == {str(ckpt / "step_0000002")}
    # Rank 0 renamed only after the slower rank had written (barrier before rename).
    assert _complete(ckpt / "step_0000002", world=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000002"]
    assert set(json.loads((ckpt / "step_0000002" / "MANIFEST.json").read_text())["files"]) == {
        "rank0.pt", "rank1.pt", "DONE0", "DONE1"}
