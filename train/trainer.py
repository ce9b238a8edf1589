"""The thin trainer: wires model, data, optimizer, engine, checkpoints and metrics.

``python -m train --config configs/X.yaml [section.key=value ...]`` runs the same
way as a plain process, under ``torchrun`` and under SLURM/submitit: rank and world
come from :func:`train.distenv.dist_env_from`. Everything with a policy lives in
its own module (``optim``, ``schedule``, ``checkpoint``, ``metrics``, ``signals``,
``engine``); this file only decides the order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist

from train.checkpoint import CheckpointManager, gather_objects, rng_state, set_rng_state, step_dir_name
from train.config import Config, load_config, save_config
from train.configbase import ConfigError, to_dict
from train.distenv import DistEnv, dist_env_from
from train.metrics import MetricLogger, NonFiniteLossError
from train.optim import build_optimizer
from train.schedule import build_scheduler
from train.seeding import stable_seed
from train.signals import StopFlag

log = logging.getLogger("train")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
FINAL_MODEL = "model.pt"


@dataclass
class RunResult:
    """How a run ended: ``finished`` (all steps) or ``preempted`` (signal; resume continues)."""

    status: Literal["finished", "preempted"]
    step: int
    run_dir: Path


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """``auto``: this rank's GPU (``cuda:local_rank``) if CUDA is available, else CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def total_steps_for(cfg: Config, steps_per_epoch: int | None) -> int:
    """``train.steps``, or ``train.epochs`` times the loader's (global) steps per epoch."""
    if cfg.train.steps is not None:
        if cfg.train.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {cfg.train.steps}")
        return cfg.train.steps
    if not steps_per_epoch:
        raise ConfigError(
            "train.epochs needs a known epoch length of at least one global batch: "
            "set data.samples_per_epoch or use train.steps"
        )
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Init the process group (nccl on CUDA, gloo on CPU) for world > 1; destroy it after.

    A group the caller already initialized is used as is and left alone.
    """
    if not env.distributed or dist.is_initialized():
        if dist.is_initialized() and dist.get_world_size() != env.world_size:
            raise RuntimeError(f"process group has {dist.get_world_size()} ranks, DistEnv says {env.world_size}")
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=env.init_method, rank=env.rank, world_size=env.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Same seed on every rank (identical model init) for python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run; build with the resolved config, then call :meth:`fit`."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device):
        from train.data import build_train_loader
        from train.engine import build_engine
        from train.model import build_model

        if cfg.train.checkpoint_every < 1 or cfg.eval.every < 0:
            raise ConfigError("train.checkpoint_every must be >= 1 and eval.every >= 0")
        self.cfg, self.env, self.device = cfg, env, device
        self.run_dir = cfg.run.dir
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        seed_everything(cfg.train.seed)
        self.bundle = build_model(cfg.model)
        model = self.bundle.model.to(device)
        self.loader = build_train_loader(
            cfg, env, self.bundle.tokenizer, self.bundle.image_size, self.bundle.mean, self.bundle.std
        )
        self.total_steps = total_steps_for(cfg, getattr(self.loader, "steps_per_epoch", None))
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps)
        self.engine = build_engine(cfg, model, optimizer, scheduler, env, device)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_checkpoints, env)
        self.step, self.saved_step = 0, -1
        rng = self._restore(self.checkpoints.resolve(cfg.train.resume))
        # Iterating starts loader workers, which draws from the torch RNG: do it before the
        # RNG is restored, so a resumed run continues the uninterrupted run's streams.
        self._batches = iter(self.loader)
        if rng is not None:
            set_rng_state(rng)
        else:
            # Per-rank streams (patch dropout, ...) that still derive from the one seed.
            torch.manual_seed(stable_seed("train", cfg.train.seed, env.rank))
        self.metrics = MetricLogger(
            self.run_dir, env, device, self.total_steps, start_step=self.step,
            log_every=cfg.train.log_every, global_batch=cfg.data.batch_size * env.world_size,
            progress=cfg.train.progress, check_finite=cfg.train.detect_anomaly_keys,
        )
        if self.step == 0:
            self.metrics.log_hparams(cfg)

    def _restore(self, ckpt: Path | None) -> dict[str, Any] | None:
        """Load a checkpoint; returns this rank's RNG state to set once the loop is ready."""
        if ckpt is None:
            return None
        extra = self.engine.load_checkpoint(ckpt)
        if extra.get("world_size") != self.env.world_size:
            raise RuntimeError(
                f"{ckpt} was written by {extra.get('world_size')} ranks, this job has {self.env.world_size}: "
                "exact resume needs the same world size (RNG and data position are per rank)"
            )
        self.step = self.saved_step = int(extra["step"])
        self.loader.load_state_dict(extra["data"][self.env.rank])
        log.info("resumed from %s at step %d", ckpt, self.step)
        return extra["rng"][self.env.rank]

    def _next_batch(self) -> Any:
        try:
            return next(self._batches)
        except StopIteration:  # the contract says infinite (epochs roll over inside the loader)
            raise RuntimeError(f"the data loader ended at step {self.step}; it must be infinite") from None

    def train_step(self) -> None:
        """The loop body: batch (timed) -> engine step -> metrics -> maybe checkpoint/eval."""
        t0 = time.perf_counter()
        batch = self._next_batch()
        wait = time.perf_counter() - t0
        outputs = self.engine.step(batch)
        self.step += 1
        self.metrics.record(self.step, outputs, batch.keys, wait, self.engine.optimizer.param_groups[0]["lr"])
        if self.step % self.cfg.train.checkpoint_every == 0:
            self.save()
        if self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
            self.evaluate()

    def fit(self, stop: StopFlag) -> RunResult:
        """Train to the end or until a stop is requested; always leaves a checkpoint."""
        status: Literal["finished", "preempted"] = "finished"
        while self.step < self.total_steps:
            self.train_step()
            if self.step < self.total_steps and stop.should_stop():
                status = "preempted"
                log.warning("stop requested (%s): checkpointing at step %d", stop.signal_name or "request", self.step)
                break
        self.save()
        if status == "finished":
            if self.cfg.eval.at_end and not (self.cfg.eval.every and self.step % self.cfg.eval.every == 0):
                self.evaluate()
            self._write_final_model()
        if self.loader.stats:
            log.info("data loader counters: %s", self.loader.stats)
        return RunResult(status, self.step, self.run_dir)

    def save(self) -> None:
        """Checkpoint the current step (collective), unless it is already saved."""
        if self.saved_step == self.step:
            return
        self.metrics.flush()  # the NaN check runs before a checkpoint can capture bad weights
        state = {"rng": rng_state(), "data": self.loader.state_dict()}
        per_rank = gather_objects(state, self.env)
        extra = {
            "step": self.step,
            "epoch": self.loader.epoch,
            "world_size": self.env.world_size,
            "rng": [s["rng"] for s in per_rank],
            "data": [s["data"] for s in per_rank],
            "config": to_dict(self.cfg),
        }
        path = self.checkpoints.save(self.engine, self.step, extra)
        self.saved_step = self.step
        log.info("checkpoint %s", path)

    def evaluate(self) -> None:
        """Zero-shot/retrieval through the eval harness on rank 0; other ranks wait.

        Every rank enters ``engine.full_model()`` because gathering ZeRO-3 shards is
        collective; only rank 0 evaluates.
        """
        if not self.cfg.eval.benchmarks:
            return
        with self.engine.full_model() as model:
            if self.env.is_main:
                from eval.api import evaluate

                model.eval()
                try:
                    with torch.no_grad():
                        results = {n: float(v) for n, v in evaluate(self.bundle, self.cfg.eval.benchmarks, self.device)}
                finally:
                    model.train()
                self.metrics.log_eval(self.step, results)
                out = self.run_dir / "eval" / f"{step_dir_name(self.step)}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"step": self.step, "results": results}, indent=2))
            if self.env.distributed:
                dist.barrier()

    def _write_final_model(self) -> None:
        """``run_dir/model.pt``: the plain open_clip state_dict (CPU tensors), written atomically."""
        state = self.engine.consolidated_state_dict()  # collective under ZeRO
        if not self.env.is_main:
            return
        tmp = self.run_dir / f".{FINAL_MODEL}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / FINAL_MODEL)

    def close(self) -> None:
        """Release the progress bar and TensorBoard writer."""
        self.metrics.close()


def run(cfg: Config, env: DistEnv | None = None) -> RunResult:
    """Train ``cfg`` in this process (one rank of ``env``; from the environment when None)."""
    env = env or dist_env_from(os.environ)
    device = resolve_device(cfg.train.device, env)
    with process_group(env, device), StopFlag(env, device) as stop:
        trainer = Trainer(cfg, env, device)
        try:
            result = trainer.fit(stop)
        finally:
            trainer.close()
    log.info("%s at step %d: %s", result.status, result.step, result.run_dir)
    return result


def _setup_logging(env: DistEnv) -> None:
    # Our progress lines on rank 0 only; libraries (open_clip logs to the root logger) at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(message)s", stream=sys.stderr
    )
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``--config FILE`` (default configs/demo.yaml) plus ``section.key=value`` overrides.

    Returns:
        0 when finished or preempted (resume with ``train.resume=auto``), 1 on a NaN/inf
        loss, 2 on a config error.
    """
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a CLIP model (see configs/).")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 train.steps=100")
    args = parser.parse_args(argv)
    env = dist_env_from(os.environ)
    _setup_logging(env)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(cfg, env)
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    if env.is_main:  # one machine-readable result line per job
        print(json.dumps({"status": result.status, "step": result.step, "run_dir": str(result.run_dir)}), flush=True)
    return 0
