"""Atomic, pruned checkpoints: ``checkpoints/step_XXXXXXX/`` plus a ``latest`` pointer.

Every rank writes into ``checkpoints/.tmp-step_XXXXXXX`` (through the engine, which
knows what each rank owns); then rank 0 renames the folder and atomically
replaces the text file ``latest`` (temp file + ``os.replace``). A crash at any
point therefore leaves ``latest`` naming a complete folder (or no ``latest`` at
all), and the next save removes the debris.

Per-rank state (RNG, data position) is gathered to every rank with
``all_gather_object`` and stored in the engine's ``extra`` dict, so that each rank
of a resumed job restores its own.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train.distenv import DistEnv

LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")
# Test-only fault injection: "STEP:PHASE" kills this process with SIGKILL while saving
# STEP, after the temp folder is written ("written") or after the rename but before
# ``latest`` is updated ("renamed"). Used by the kill-and-resume tests.
ABORT_ENV = "ORBITCLIP_TEST_CHECKPOINT_ABORT"


def step_dir_name(step: int) -> str:
    """``step_0000100`` for step 100."""
    return f"step_{step:07d}"


def _barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()


def _maybe_abort(step: int, phase: str) -> None:
    spec = os.environ.get(ABORT_ENV)
    if spec and spec == f"{step}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-item list when not distributed)."""
    if not (env.distributed and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


class CheckpointManager:
    """Saves, finds and prunes checkpoints under ``root`` (``<run_dir>/checkpoints``).

    Args:
        root: the checkpoints folder.
        keep: how many step folders to keep (>= 1); older ones are deleted after a save.
        env: where this process sits; rank 0 does the renames and deletions.
    """

    def __init__(self, root: str | Path, keep: int, env: DistEnv):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.env = env

    def step_dirs(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The folder ``latest`` names, or None when no checkpoint was completed yet.

        Raises:
            FileNotFoundError: ``latest`` names a folder that is gone (deleted by hand).
        """
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not _STEP_RE.match(name) or not path.is_dir():
            raise FileNotFoundError(f"{pointer} names {name!r}, which is not a checkpoint folder in {self.root}")
        return path

    def resolve(self, resume: str | None) -> Path | None:
        """Which checkpoint ``train.resume`` means: None, ``auto`` (latest, if any) or a path.

        A path may be a step folder, a checkpoints folder or a run directory (its latest).
        """
        if resume is None or resume == "":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        for candidate in (path, path / "checkpoints"):
            if (candidate / LATEST).is_file():
                found = CheckpointManager(candidate, 1, self.env).latest()
                if found is not None:
                    return found
        if path.is_dir():
            return path
        raise FileNotFoundError(f"train.resume={resume!r}: no such checkpoint folder")

    def save(self, engine: Any, step: int, extra: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically; every rank must call this (collective).

        Args:
            engine: has ``save_checkpoint(dir, extra)``, called on every rank.
            step: the number of optimizer steps done.
            extra: picklable state stored with the checkpoint (step, RNG, data, config).

        Returns:
            The final folder ``root/step_XXXXXXX``.
        """
        name = step_dir_name(step)
        tmp = self.root / f".tmp-{name}"
        final = self.root / name
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_debris()
            tmp.mkdir()  # engines write into an existing empty folder
        _barrier(self.env)
        engine.save_checkpoint(str(tmp), extra)
        _barrier(self.env)  # every rank's shard is on disk before the folder becomes visible
        if self.env.is_main:
            _maybe_abort(step, "written")
            if final.exists():  # left by a crash between rename and pointer update; never "latest"
                shutil.rmtree(final)
            os.rename(tmp, final)
            _maybe_abort(step, "renamed")
            _write_text_atomic(self.root / LATEST, name + "\n")
            self._prune(keep_also=final)
        _barrier(self.env)
        return final

    def _remove_debris(self) -> None:
        """Temp folders of interrupted saves; they were never pointed to."""
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-step_"):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self, keep_also: Path) -> None:
        dirs = self.step_dirs()
        for path in dirs[: max(0, len(dirs) - self.keep)]:
            if path != keep_also:
                shutil.rmtree(path, ignore_errors=True)
