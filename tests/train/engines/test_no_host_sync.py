"""No host sync inside a step: nothing in a training step reads a tensor's value on the host.

On CUDA a ``.item()`` / ``float()`` / ``bool()`` of a device tensor waits for every queued
kernel, so one per step serializes the GPU. On this CPU machine such reads are free and
invisible, so the test counts them: the Python-level ways to read a tensor on the host are
patched for the duration of a step. (Syncs hidden inside torch ops, e.g. ``torch.unique``
for ``train.unique_texts``, are for the GPU check's ``torch.cuda.set_sync_debug_mode``.)
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Iterator

import torch

from tests.distutil import run_distributed
from tests.train.engines.equiv_workers import make_batch, make_model
from tests.train.test_trainer import micro_cfg
from train.core.collectives import Comm
from train.core.config import Config
from train.core.distenv import DistEnv
from train.engines import EngineParts, build_engine
from train.optim import build_optimizer, build_scheduler

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Record every Python-level host read of a tensor (with the line that did it)."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str, original):
        def read(self, *args, **kwargs):
            frame = traceback.extract_stack(limit=3)[0]
            calls.append(f"{name} at {Path(frame.filename).name}:{frame.lineno}")
            return original(self, *args, **kwargs)
        return read

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _engine(model: torch.nn.Module, accum: int, rank: int = 0, world: int = 1):
    cfg = Config()
    cfg.train.accum_steps, cfg.train.precision, cfg.optim.clip_grad_norm = accum, "fp32", 1.0
    opt = build_optimizer(model, cfg.optim)  # fused AdamW: the found_inf skip path is on
    sched = build_scheduler(opt, cfg.optim, 100)
    env = DistEnv(rank=rank, world_size=world)
    return build_engine("ddp", EngineParts.from_config(cfg, model, opt, sched, env, "cpu", Comm(env)))


def test_ddp_step_reads_nothing_on_the_host():
    for accum in (1, 2):
        model = make_model()
        engine = _engine(model, accum)
        assert engine.skip_on_device
        engine.step(make_batch(0, 0, 1, model))  # warm-up: lazy optimizer state
        with count_host_reads() as calls:
            out = engine.step(make_batch(1, 0, 1, model))
        assert calls == [], f"accum {accum}"
        assert out["finite"].dtype == torch.float32  # the skip decision stayed a tensor


def test_the_counter_sees_a_host_read():
    with count_host_reads() as calls:
        float(torch.ones(()))
        if torch.ones(()) > 0:
            pass
    assert [c.split(" ")[0] for c in calls] == ["__float__", "__bool__"]


def test_trainer_steps_between_log_steps_read_nothing(tmp_path):
    from train.loop.signals import StopFlag
    from train.trainer import Trainer

    cfg = micro_cfg(tmp_path / "run", "train.steps=6", "train.log_every=5", "train.checkpoint_every=100")
    env = DistEnv()
    trainer = Trainer(cfg, env, torch.device("cpu"), Comm(env))
    stop = StopFlag()
    try:
        trainer.train_step(stop)  # step 1 logs the sample grid and warms up the optimizer
        with count_host_reads() as calls:
            for _ in range(3):  # steps 2-4: no log, checkpoint or eval step
                trainer.train_step(stop)
        assert calls == []
    finally:
        trainer.close()


def _two_ranks(rank: int, world: int) -> list[str]:
    model = make_model()
    engine = _engine(model, 2, rank, world)
    engine.step(make_batch(0, rank, world, model))
    with count_host_reads() as calls:
        engine.step(make_batch(1, rank, world, model))
    return calls


def test_two_rank_step_reads_nothing_on_the_host():
    assert run_distributed(_two_ranks, 2, timeout=120) == [[], []]
