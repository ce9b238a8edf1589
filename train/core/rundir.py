"""The run-directory layout: the only code that knows the names of what a run writes.

::

    <root>/<name>/
      config.yaml                  # the resolved config that ran
      model.pt                     # final weights (plain open_clip state_dict)
      open_clip_config.json        # architecture + preprocessing, next to model.pt
      checkpoints/latest           # names the newest complete step folder
      checkpoints/step_0000200/    # model.pt, optimizer.pt, scheduler.pt, extra.pt, MANIFEST.json
      tb/  eval/  slurm/<job id>/

Trainer, engines, checkpoints, export, eval (run directories as model specs) and
``launch status`` all go through :class:`RunDir` and :class:`CheckpointDir`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    """``step_0000100`` for step 100."""
    return f"step_{step:07d}"


def parse_step(name: str) -> int | None:
    """The step of a ``step_XXXXXXX`` name, None for anything else."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint folder and the names of the files in it."""

    path: Path

    @property
    def step(self) -> int | None:
        return parse_step(self.path.name)

    @property
    def model(self) -> Path:
        """Plain open_clip state_dict (every engine writes it, consolidated)."""
        return self.path / "model.pt"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.pt"

    @property
    def scheduler(self) -> Path:
        return self.path / "scheduler.pt"

    @property
    def extra(self) -> Path:
        """Step, per-rank RNG and data positions, world size, resolved config."""
        return self.path / "extra.pt"

    @property
    def manifest(self) -> Path:
        """Checksums of every file, written last (see :mod:`train.loop.checkpoint`)."""
        return self.path / "MANIFEST.json"


@dataclass(frozen=True)
class RunDir:
    """A run directory (``run.root/run.name``); nothing is created by building one."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def final_model(self) -> Path:
        return self.path / "model.pt"

    @property
    def model_config(self) -> Path:
        """open_clip's ``open_clip_config.json`` (makes ``model.pt`` loadable as ``local-dir:``)."""
        return self.path / "open_clip_config.json"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def slurm(self) -> Path:
        return self.path / "slurm"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def latest_pointer(self) -> Path:
        return self.checkpoints / "latest"

    def eval_result(self, step: int) -> Path:
        """Where the evaluation at ``step`` writes its JSON."""
        return self.eval_dir / f"{step_name(step)}.json"

    def eval_files(self, step: int) -> Path:
        """Folder for the pictures of the evaluation at ``step``."""
        return self.eval_dir / step_name(step)

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints / step_name(step))

    def temp_checkpoint(self, step: int) -> CheckpointDir:
        """Where checkpoint ``step`` is written before it is published by a rename."""
        return CheckpointDir(self.checkpoints / f"{_TMP_PREFIX}{step_name(step)}")

    def temp_checkpoints(self) -> list[Path]:
        """Folders of interrupted saves (never pointed to by ``latest``)."""
        if not self.checkpoints.is_dir():
            return []
        return [p for p in self.checkpoints.iterdir() if p.name.startswith(_TMP_PREFIX + "step_")]

    def step_checkpoints(self) -> list[CheckpointDir]:
        """Published step folders, oldest first (complete or not: see the manifest)."""
        if not self.checkpoints.is_dir():
            return []
        found = [(s, p) for p in self.checkpoints.iterdir() if (s := parse_step(p.name)) is not None and p.is_dir()]
        return [CheckpointDir(p) for _, p in sorted(found)]

    def latest_name(self) -> str | None:
        """What ``checkpoints/latest`` says, or None when there is no pointer."""
        if not self.latest_pointer.is_file():
            return None
        return self.latest_pointer.read_text().strip()

    def latest(self) -> CheckpointDir | None:
        """The checkpoint ``latest`` names, or None when no checkpoint was completed yet.

        Raises:
            FileNotFoundError: ``latest`` names a folder that is gone (deleted by hand).
        """
        name = self.latest_name()
        if name is None:
            return None
        ckpt = CheckpointDir(self.checkpoints / name)
        if parse_step(name) is None or not ckpt.path.is_dir():
            raise FileNotFoundError(f"{self.latest_pointer} names {name!r}, which is not a checkpoint folder")
        return ckpt

    def newest_model_file(self) -> Path:
        """The newest weights: the latest checkpoint's ``model.pt``, else the final ``model.pt``."""
        ckpt = self.latest()
        if ckpt is not None:
            if not ckpt.model.is_file():
                raise FileNotFoundError(f"{self.latest_pointer} names {ckpt.path.name!r} but {ckpt.model} is missing")
            return ckpt.model
        if self.final_model.is_file():
            return self.final_model
        raise FileNotFoundError(f"{self.path}: no checkpoints/latest and no model.pt (no checkpoint saved yet?)")

    @classmethod
    def containing(cls, path: Path, levels: int = 3) -> RunDir | None:
        """The run directory ``path`` lies in (a folder holding ``config.yaml``), if any."""
        path = Path(path)
        start = path if path.is_dir() else path.parent
        for folder in [start, *list(start.parents)[:levels]]:
            if (folder / "config.yaml").is_file():
                return cls(folder)
        return None

    def is_run(self) -> bool:
        """Whether this folder holds a run's ``config.yaml``."""
        return self.config.is_file()
