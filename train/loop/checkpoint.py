"""Atomic, durable, verified checkpoints: ``checkpoints/step_XXXXXXX/`` plus a ``latest`` pointer.

Saving (every rank calls :meth:`CheckpointManager.save`):

1. every rank writes into ``checkpoints/.tmp-step_XXXXXXX`` through the engine (which knows
   what each rank owns) and fsyncs what it wrote (each node flushes its own pages);
2. rank 0 writes ``MANIFEST.json`` (size and SHA-256 of every file), fsyncs it and the
   folders, renames the folder to ``step_XXXXXXX``, fsyncs ``checkpoints/``, and replaces
   ``latest`` atomically and durably.

So after a process kill *or* a machine crash, ``latest`` names a folder whose files are on
disk (or there is no ``latest``), and the next save removes the debris. Resuming verifies
the manifest; a truncated or corrupted newest checkpoint is reported and the newest older
one that verifies is used instead.

Per-rank state (RNG, data position) is gathered to every rank and stored in the engine's
``extra`` dict, so that each rank of a resumed job restores its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from train.core.collectives import Comm
from train.core.configbase import ConfigError
from train.core.errors import UserError
from train.core.files import fsync_dir, fsync_tree, sha256_file, write_text_durable
from train.core.rundir import CheckpointDir, RunDir, step_name

log = logging.getLogger("train")
# Test-only fault injection: "STEP:PHASE" kills this process with SIGKILL while saving
# STEP, after the temp folder is written ("written") or after the rename but before
# ``latest`` is updated ("renamed"). Used by the kill-and-resume tests.
ABORT_ENV = "ORBITCLIP_TEST_CHECKPOINT_ABORT"


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was asked for."""


def _maybe_abort(step: int, phase: str) -> None:
    spec = os.environ.get(ABORT_ENV)
    if spec and spec == f"{step}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_manifest(ckpt: CheckpointDir, step: int) -> dict[str, Any]:
    """Record size and SHA-256 of every file in ``ckpt`` (the manifest itself excluded)."""
    files = {}
    for path in sorted(p for p in ckpt.path.rglob("*") if p.is_file() and p != ckpt.manifest):
        rel = path.relative_to(ckpt.path).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"step": step, "files": files}
    write_text_durable(ckpt.manifest, json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify(ckpt: CheckpointDir) -> str | None:
    """Why ``ckpt`` cannot be trusted, or None when every file matches its manifest.

    A checkpoint written before manifests existed (no ``MANIFEST.json``) is trusted as is.
    """
    if not ckpt.manifest.is_file():
        return None
    try:
        manifest = json.loads(ckpt.manifest.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for rel, want in files.items():
        path = ckpt.path / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{rel} has {size} bytes, the manifest says {want['bytes']} (truncated?)"
        if sha256_file(path) != want["sha256"]:
            return f"{rel} does not match its checksum (corrupted)"
    return None


class CheckpointManager:
    """Saves, finds, verifies and prunes the checkpoints of a run directory.

    Args:
        run: the run directory (``run.checkpoints`` holds the step folders).
        keep: how many step folders to keep (>= 1); older ones are deleted after a save.
        comm: the job's collectives; rank 0 does the renames and deletions.
    """

    def __init__(self, run: RunDir, keep: int, comm: Comm):
        if keep < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.run, self.keep, self.comm = run, keep, comm

    def resolve(self, resume: str | None) -> CheckpointDir | None:
        """Which checkpoint ``train.resume`` means: None, ``auto`` (the newest that verifies) or a path.

        A path may be a step folder, a checkpoints folder or a run directory (its newest
        verified checkpoint).

        Raises:
            CheckpointError: a path without a checkpoint, or only corrupted checkpoints.
        """
        if resume is None or resume == "":
            return None
        if resume == "auto":
            return self.newest_verified(self.run)
        path = Path(resume)
        for run in (RunDir(path), RunDir(path.parent)):
            if run.latest_pointer.is_file() and (path == run.path or path == run.checkpoints):
                found = self.newest_verified(run)
                if found is not None:
                    return found
        if path.is_dir():
            problem = verify(CheckpointDir(path))
            if problem:
                raise CheckpointError(f"train.resume={resume}: {problem}")
            return CheckpointDir(path)
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint folder")

    @staticmethod
    def newest_verified(run: RunDir) -> CheckpointDir | None:
        """``latest`` if it verifies; else the newest older step folder that does (reported).

        Raises:
            CheckpointError: checkpoints exist but none verifies.
        """
        try:
            latest = run.latest()
        except FileNotFoundError as e:
            log.warning("%s; looking for an older checkpoint", e)
            latest = None
        if latest is None and run.latest_name() is None:
            return None
        candidates = [c for c in reversed(run.step_checkpoints()) if latest is None or c.step <= latest.step]
        problems = []
        for ckpt in candidates:
            problem = verify(ckpt)
            if problem is None:
                if problems:
                    log.warning("using %s instead: %s", ckpt.path.name, "; ".join(problems))
                return ckpt
            problems.append(f"checkpoint {ckpt.path.name} is unusable: {problem}")
            log.warning(problems[-1])
        raise CheckpointError("no usable checkpoint in " + str(run.checkpoints) + ": " + "; ".join(problems))

    def save(self, engine: Any, step: int, extra: dict[str, Any]) -> CheckpointDir:
        """Write checkpoint ``step`` atomically and durably; every rank must call this (collective).

        Args:
            engine: has ``save_checkpoint(dir, extra)``, called on every rank.
            step: the number of optimizer steps done.
            extra: picklable state stored with the checkpoint (step, RNG, data, config).

        Returns:
            The published folder.
        """
        tmp, final = self.run.temp_checkpoint(step), self.run.checkpoint(step)
        main = self.comm.rank == 0
        if main:
            self.run.checkpoints.mkdir(parents=True, exist_ok=True)
            for debris in self.run.temp_checkpoints():  # interrupted saves, never pointed to
                shutil.rmtree(debris, ignore_errors=True)
            tmp.path.mkdir()  # engines write into an existing empty folder
        self.comm.barrier()
        engine.save_checkpoint(str(tmp.path), extra)
        fsync_tree(tmp.path)  # each rank flushes what its node wrote
        self.comm.barrier()  # every rank's shard is on disk before the folder becomes visible
        if main:
            write_manifest(tmp, step)
            fsync_dir(tmp.path)
            _maybe_abort(step, "written")
            if final.path.exists():  # left by a crash between rename and pointer update; never "latest"
                shutil.rmtree(final.path)
            os.rename(tmp.path, final.path)
            fsync_dir(self.run.checkpoints)
            _maybe_abort(step, "renamed")
            write_text_durable(self.run.latest_pointer, step_name(step) + "\n")
            self._prune(keep_also=final)
        self.comm.barrier()
        return final

    def _prune(self, keep_also: CheckpointDir) -> None:
        dirs = self.run.step_checkpoints()
        for ckpt in dirs[: max(0, len(dirs) - self.keep)]:
            if ckpt.path != keep_also.path:
                shutil.rmtree(ckpt.path, ignore_errors=True)
