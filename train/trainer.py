"""The thin trainer: wires model, data, optimizer, engine, checkpoints, metrics and evaluation.

``python -m train`` (:mod:`train.cli`), ``torchrun`` and SLURM/submitit (``launch``, whose
job pickles name ``train.trainer:run``) all end in :func:`run`. Everything with a policy
lives in its own package (``data``, ``model``, ``objective``, ``optim``, ``engines``,
``loop``); this file only decides the order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist

from train.core import collectives
from train.core.collectives import Comm, is_peer_loss
from train.core.config import Config, save_config
from train.core.configbase import ConfigError, to_dict
from train.core.distenv import DistEnv, dist_env_from
from train.core.errors import PeerLostError
from train.core.files import write_text_durable
from train.core.heartbeat import Heartbeat, heartbeat
from train.core.rng import capture_process, restore_process, seed_everything, stable_seed
from train.core.rundir import CheckpointDir, RunDir
from train.data import build_train_loader
from train.engines import EngineParts, build_engine
from train.engines.base import choose_precision
from train.loop.checkpoint import CheckpointManager
from train.loop.metrics import MetricLogger
from train.loop.pictures import batch_grid, png_image
from train.loop.plan import check_fits, plan_step, should_check
from train.loop.signals import StopFlag
from train.model import build_model, save_model_config
from train.model.compile import compile_towers
from train.optim import build_optimizer, build_scheduler

log = logging.getLogger("train")


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
        raise ConfigError("train.device=cuda but CUDA is not available on this machine")
    device = torch.device("cuda", env.device_index(torch.cuda.device_count()))
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


def attempt_store(env: DistEnv) -> dist.Store:
    """The job's rendezvous store, under a prefix of this start of the ranks.

    torchrun ``--max-restarts`` restarts the ranks against a store (its agent's, or rank 0's
    on a static rendezvous) that may still hold the previous attempt's keys: the restarted
    ranks would read the dead ranks' addresses and fail to connect. Each rank counts itself
    in on the bare store, so the ``world_size`` ranks of the n-th start agree on prefix n
    whatever each node's agent counted (an agent restarted for a membership change does
    not count a restart, so ``TORCHELASTIC_RESTART_COUNT`` can differ between nodes).
    """
    url = f"{env.init_method}?rank={env.rank}&world_size={env.world_size}"
    store, _, _ = next(dist.rendezvous(url, timeout=timedelta(minutes=30)))
    joined = store.add("orbitclip/ranks_started", 1)
    return dist.PrefixStore(f"orbitclip/start_{(joined - 1) // env.world_size}", store)


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device, backend: str = "auto") -> Iterator[Comm]:
    """Init the process group (``auto``: nccl on CUDA, gloo on CPU) for world > 1; yields the
    job's :class:`Comm` (installed as the process's), and destroys the group after.

    A group the caller already initialized is used as is and left alone.
    """
    owned = env.distributed and not dist.is_initialized()
    if owned:
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=attempt_store(env), rank=env.rank, world_size=env.world_size)
    try:
        comm = Comm(env, device)
        collectives.install(comm)
        yield comm
    finally:
        collectives.install(None)
        if owned:
            dist.destroy_process_group()


class Trainer:
    """One training run; build with the resolved config, then call :meth:`fit`."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, comm: Comm):
        if cfg.train.checkpoint_every < 1 or cfg.eval.every < 0:
            raise ConfigError("train.checkpoint_every must be >= 1 and eval.every >= 0")
        self.cfg, self.env, self.device, self.comm = cfg, env, device, comm
        self.beat: Heartbeat | None = None
        """Set by :func:`run`: told what this rank is doing, for a stalled peer's report."""
        if cfg.eval.benchmarks:
            from eval.api import check_benchmarks

            check_benchmarks(cfg.eval.benchmarks)
        if should_check(cfg.train.memory_check, cfg, device):
            plan = plan_step(cfg, env.world_size, device)
            for line in plan.lines():
                log.info("%s", line)
            check_fits(plan, env.local_world_size, device)
        self.run = RunDir(cfg.run.dir)
        if env.is_main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run.config)
        seed_everything(cfg.train.seed)
        self.bundle = build_model(cfg.model)
        model = self.bundle.model.to(device)
        if cfg.train.compile:
            compile_towers(model)
        b = self.bundle
        self.loader = build_train_loader(cfg.data, cfg.train.seed, env, b.tokenizer, b.image_size, b.mean, b.std)
        self.total_steps = total_steps_for(cfg, getattr(self.loader, "steps_per_epoch", None))
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps)
        parts = EngineParts.from_config(cfg, model, optimizer, scheduler, env, device, comm)
        self.engine = build_engine(cfg.train.engine, parts)
        log.info("precision %s (%s) on %s", *choose_precision(cfg.train.precision, torch.device(device)), device)
        self.checkpoints = CheckpointManager(self.run, cfg.train.keep_checkpoints, comm)
        self.step, self.saved_step = 0, -1
        rng = self._restore(self.checkpoints.resolve(cfg.train.resume))
        self._batches = iter(self.loader)
        if rng is not None:
            restore_process(rng)
        else:
            # Per-rank streams (patch dropout, ...) that still derive from the one seed.
            torch.manual_seed(stable_seed("train", cfg.train.seed, env.rank))
        max_bad = cfg.train.max_nonfinite_steps if getattr(self.engine, "skip_on_device", False) else 1
        self.metrics = MetricLogger(
            self.run, comm, device, self.total_steps, start_step=self.step, log_every=cfg.train.log_every,
            global_batch=cfg.data.batch_size * env.world_size, progress=cfg.train.progress,
            max_nonfinite=max_bad if cfg.train.detect_anomaly_keys else 0,
        )
        self.agreed: dict[str, bool] = {}
        if self.step == 0:
            self.metrics.log_hparams(cfg)

    def _restore(self, ckpt: CheckpointDir | None) -> dict[str, Any] | None:
        """Load a checkpoint; returns this rank's RNG state to set once the loop is ready."""
        if ckpt is None:
            return None
        extra = self.engine.load_checkpoint(ckpt.path)
        if extra.get("world_size") != self.env.world_size:
            raise ConfigError(
                f"{ckpt.path} was written by {extra.get('world_size')} ranks, this job has {self.env.world_size}: "
                "exact resume needs the same world size (RNG and data position are per rank); "
                "start a new run from its weights with model.pretrained=" + str(ckpt.model)
            )
        self.step = self.saved_step = int(extra["step"])
        self.loader.load_state_dict(extra["data"][self.env.rank])
        log.info("resumed from %s at step %d", ckpt.path, self.step)
        return extra["rng"][self.env.rank]

    def _next_batch(self) -> tuple[Any, float]:
        before = self.loader.wait_seconds
        try:
            batch = next(self._batches)
        except StopIteration:  # the contract says infinite (epochs roll over inside the loader)
            raise RuntimeError(f"the data loader ended at step {self.step}; it must be infinite") from None
        return batch, self.loader.wait_seconds - before

    def train_step(self, stop: StopFlag) -> None:
        """The loop body: batch -> engine step -> metrics -> maybe checkpoint/eval."""
        if self.beat is not None:
            self.beat.where = f"in step {self.step + 1}"
        batch, wait = self._next_batch()
        if self.step == 0:
            self.metrics.log_image("train/samples", batch_grid(batch.images, self.bundle.mean, self.bundle.std), 0)
        outputs = self.engine.step(batch)
        self.step += 1
        self.metrics.record(self.step, outputs, batch.keys, wait)
        if self.metrics.due(self.step):
            self.agreed = self.metrics.flush({"stop": stop.requested})
        if self.step % self.cfg.train.checkpoint_every == 0:
            self.save()
        if self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
            self.evaluate()

    def _should_stop(self, stop: StopFlag) -> bool:
        # Alone: after any step. With peers: at the log step where the flush agreed on it.
        return stop.requested if self.comm.world == 1 else self.agreed.pop("stop", False)

    def fit(self, stop: StopFlag) -> RunResult:
        """Train to the end or until a stop is requested; always leaves a checkpoint."""
        status: Literal["finished", "preempted"] = "finished"
        while self.step < self.total_steps:
            self.train_step(stop)
            if self.step < self.total_steps and self._should_stop(stop):
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
        return RunResult(status, self.step, self.run.path)

    def save(self) -> None:
        """Checkpoint the current step (collective), unless it is already saved."""
        if self.saved_step == self.step:
            return
        if self.beat is not None:
            self.beat.where = f"checkpointing step {self.step}"
        self.metrics.flush()  # the non-finite check runs before a checkpoint can capture bad weights
        per_rank = self.comm.all_gather_object({"rng": capture_process(), "data": self.loader.state_dict()})
        extra = {
            "step": self.step,
            "epoch": self.loader.epoch,
            "world_size": self.env.world_size,
            "rng": [s["rng"] for s in per_rank],
            "data": [s["data"] for s in per_rank],
            "config": to_dict(self.cfg),
        }
        ckpt = self.checkpoints.save(self.engine, self.step, extra)
        self.saved_step = self.step
        log.info("checkpoint %s", ckpt.path)

    def evaluate(self) -> None:
        """Zero-shot/retrieval through the eval harness, on every rank.

        Every rank embeds its share of each benchmark's images (the Comm gathers them), so
        evaluation is faster with more ranks and no rank idles in a barrier; a failure on
        any rank ends every rank with that error (:meth:`Comm.agreement`).
        """
        if not self.cfg.eval.benchmarks:
            return
        from eval.api import evaluate

        if self.beat is not None:
            self.beat.where = f"evaluating at step {self.step}"
        figures: dict[str, Path] = {}
        with self.engine.full_model() as model, self.comm.agreement(f"evaluation at step {self.step}"):
            model.eval()
            try:
                with torch.no_grad():
                    results = {n: float(v) for n, v in evaluate(
                        self.bundle, self.cfg.eval.benchmarks, self.device, out_dir=self.run.eval_files(self.step),
                        batch_size=self.cfg.eval.batch_size, partition=self.comm, write=self.env.is_main,
                        figures=figures)}
            finally:
                model.train()
            if self.env.is_main:
                self.metrics.log_eval(self.step, results)
                for tag, path in sorted(figures.items()):
                    self.metrics.log_image(f"eval/{tag}", png_image(path), self.step)
                self.run.eval_dir.mkdir(parents=True, exist_ok=True)
                write_text_durable(self.run.eval_result(self.step),
                                   json.dumps({"step": self.step, "results": results}, indent=2))

    def _write_final_model(self) -> None:
        """``model.pt`` (plain open_clip state_dict, CPU tensors) and ``open_clip_config.json``
        next to it (architecture, preprocessing, step): the run describes its own model, for
        ``load_model`` and ``python -m train export``, whatever registry or source built it."""
        state = self.engine.consolidated_state_dict()  # collective under ZeRO
        if not self.env.is_main:
            return
        tmp = self.run.path / f".{self.run.final_model.name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.run.final_model)
        save_model_config(self.bundle, self.run.path, step=self.step)

    def close(self) -> None:
        """Release the progress bar and TensorBoard writer."""
        self.metrics.close()


def run(cfg: Config, env: DistEnv | None = None) -> RunResult:
    """Train ``cfg`` in this process (one rank of ``env``; from the environment when None)."""
    env = env or dist_env_from(os.environ)
    device = resolve_device(cfg.train.device, env)
    if cfg.train.peer_timeout_s < 0:
        raise ConfigError(f"train.peer_timeout_s must be >= 0 (0 = no heartbeat), got {cfg.train.peer_timeout_s}")
    with process_group(env, device, cfg.train.dist_backend) as comm, StopFlag() as stop, \
            heartbeat(comm, cfg.train.peer_timeout_s) as beat:
        trainer = Trainer(cfg, env, device, comm)
        trainer.beat = beat
        try:
            result = trainer.fit(stop)
        except Exception as e:
            if env.distributed and is_peer_loss(e) and not isinstance(e, PeerLostError):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise PeerLostError(f"rank {env.rank}: a peer rank was lost at step {trainer.step} ({first}); "
                                    "the run can resume from its last complete checkpoint") from e
            raise
        finally:
            trainer.close()
    log.info("%s at step %d: %s", result.status, result.step, result.run_dir)
    return result
