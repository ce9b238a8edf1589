"""What the package restructuring must not break: checkpoints and job pickles written before it.

The previous release wrote the same checkpoint files without ``MANIFEST.json``, with a
non-fused AdamW (param groups saying ``fused: None``) and without the data position's
``cuts``; submitit job pickles name the config class ``train.config.Config``. (A checkpoint
written by the previous release's own code, commit 2d03266, was also resumed by hand: it
continued to the end, weights within 1.1e-7 of that release's uninterrupted run — the
fused AdamW kernel's rounding.)
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from tests.train.test_trainer import micro_cfg
from train.core.config import Config
from train.trainer import run


def _as_previous_release_wrote_it(ckpt: Path) -> None:
    (ckpt / "MANIFEST.json").unlink()
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    for group in opt["param_groups"]:
        group["fused"] = None
    torch.save(opt, ckpt / "optimizer.pt")
    extra = torch.load(ckpt / "extra.pt", weights_only=False)
    for state in extra["data"]:
        state.pop("cuts", None)
    torch.save(extra, ckpt / "extra.pt")


def test_a_checkpoint_of_the_previous_release_resumes(tmp_path, monkeypatch):
    import train.trainer

    run_dir = tmp_path / "run"
    run(micro_cfg(run_dir, "train.steps=3", "model.patch_dropout=0.5"))
    ckpt = run_dir / "checkpoints" / "step_0000003"
    _as_previous_release_wrote_it(ckpt)
    (run_dir / "model.pt").unlink()
    engines = []
    real = train.trainer.build_engine
    monkeypatch.setattr(train.trainer, "build_engine", lambda *a, **k: engines.append(real(*a, **k)) or engines[-1])
    result = run(micro_cfg(run_dir, "train.steps=6", "model.patch_dropout=0.5"))
    assert result.status == "finished" and result.step == 6
    groups = engines[0].optimizer.param_groups
    assert all(g["fused"] is True for g in groups)  # this run's kernel, not the checkpoint's
    assert json.loads((run_dir / "checkpoints" / "step_0000006" / "MANIFEST.json").read_text())["step"] == 6


def test_a_job_pickle_naming_train_config_still_loads():
    cfg = Config()
    cfg.run.name = "old-job"
    text = pickle.dumps(cfg, protocol=0)
    assert b"train.core.config" in text
    old = text.replace(b"train.core.config", b"train.config")  # what a pickle of the previous release says
    loaded = pickle.loads(old)
    assert isinstance(loaded, Config) and loaded.run.name == "old-job"
