"""The callable that submitit runs on every task of a job, and its requeue hook.

dinov2-style: ``TrainTask(cfg)()`` sets the torch.distributed rendezvous from
``submitit.JobEnvironment`` and calls the trainer. How it composes with
preemption:

1. submitit's job runner installs its handler for the preemption signal (USR1,
   see :mod:`launch.preempt`) before calling us; SIGTERM it only logs.
2. The trainer installs its own SIGTERM/SIGUSR1 handlers for the duration of
   ``run``: on either signal it saves a checkpoint at the next step boundary
   (all ranks agree on the step) and returns status ``"preempted"``.
3. We then invoke the submitit handler we saved in step 1, which calls
   :meth:`TrainTask.checkpoint` (a fresh task with ``train.resume=auto``), writes
   it as the job's new pickle, requeues (``scontrol requeue`` on SLURM, exit code
   144 for the local controller) and exits. The requeued job resumes from the
   checkpoint written in step 2, i.e. from the exact step.

A signal that arrives before the trainer has installed its handlers goes to
submitit's handler directly: requeue at once, resume from the last periodic
checkpoint (same final parameters, some steps redone).

A lost peer (a rank's process killed, a node gone: :class:`PeerLostError` from a
collective, or the heartbeat's report of a silent peer) takes the same road with no
checkpoint of its own: rank 0 requeues the job through the same handler and the new
attempt resumes from the last complete periodic checkpoint. ``peer_requeues`` bounds how
often (a node that keeps failing must end the job). If rank 0's own node is the one lost,
no rank is left to ask: that node hosts the batch script, and SLURM requeues a job whose
node failed by itself (``--requeue``, which the launcher sets).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
import subprocess
import sys
import zlib
from typing import Any, Callable

import submitit
from submitit.core.job_environment import SignalHandler

from train.api import Config, DistEnv, PeerLostError, UserError, dist_env_from, on_peer_lost

log = logging.getLogger(__name__)

DEFAULT_TARGET = "train.trainer:run"


def port_for_job(job_id: str) -> int:
    """A rendezvous port derived from the job id, identical on every task of the job.

    Different jobs (and array members ``123_0``, ``123_1``) sharing a node get
    different ports with high probability.
    """
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def job_dist_env() -> DistEnv:
    """This task's place in the job, from submitit's JobEnvironment.

    Outside a submitit job (a plain call, torchrun) the process environment is used.
    """
    try:
        job = submitit.JobEnvironment()
    except RuntimeError:
        return dist_env_from(os.environ)
    nodes = max(1, job.num_nodes)
    # One node: loopback needs no name resolution; several: the first host of the job.
    master = "127.0.0.1" if nodes == 1 else job.hostnames[0]
    return DistEnv(
        rank=job.global_rank,
        world_size=job.num_tasks,
        local_rank=job.local_rank,
        local_world_size=max(1, job.num_tasks // nodes),
        master_addr=master,
        master_port=port_for_job(str(job.job_id)),
        launcher="slurm" if job.cluster == "slurm" else "torchrun",
    )


def export_dist_env(env: DistEnv) -> None:
    """Set torchrun's variables so anything reading them (DeepSpeed, the trainer) agrees."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def setup_logging(env: DistEnv) -> None:
    """Trainer and launcher INFO lines (resume, checkpoints) into rank 0's job log; warnings elsewhere.

    Handlers go on our own loggers, not the root one, so submitit's lines are not doubled.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s"))
    for name in ("train", "launch"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(logging.INFO if env.is_main else logging.WARNING)


class TrainerInputError(RuntimeError):
    """The trainer rejected its input (config, data, checkpoint, model file): a user error.

    Raised in the job in place of the trainer's own exception (chained, so the job log
    keeps the whole traceback) with that exception's first line as its message, so that
    the launcher can show one line where it would otherwise show a remote traceback.
    """


_INPUT_ERROR_PREFIX = f"{TrainerInputError.__module__}.{TrainerInputError.__qualname__}: "


def _trainer_input_errors() -> tuple[type[BaseException], ...]:
    """The trainer's exception types that mean bad input rather than a bug."""
    return UserError, FileNotFoundError


def input_error_line(trace: str) -> str | None:
    """The message of a :class:`TrainerInputError` in a job's error text (submitit's traceback), or None."""
    for line in reversed(trace.splitlines()):
        if line.startswith(_INPUT_ERROR_PREFIX):
            return line[len(_INPUT_ERROR_PREFIX):]
    return None


def resolve_target(target: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"target {target!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def _submitit_requeue_handler() -> Callable[[int, Any], None] | None:
    """submitit's preemption handler if we run inside a submitit job runner, else None."""
    sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG, None)
    if sig is None:
        return None
    handler = signal.getsignal(sig)
    if isinstance(getattr(handler, "__self__", None), SignalHandler):
        return handler  # type: ignore[return-value]
    return None


class TrainTask:
    """One training run as a checkpointable submitit callable.

    Args:
        cfg: The resolved config (run.root should be absolute: jobs may start elsewhere).
        target: The trainer entry point ``module:function`` called as ``fn(cfg, env)``.
    """

    peer_requeues: int = 3
    """Requeues left for lost peers (a class default: job pickles of older versions lack it)."""
    _lost_peer: bool = False

    def __init__(self, cfg: Config, target: str = DEFAULT_TARGET, peer_requeues: int = 3) -> None:
        self.cfg = cfg
        self.target = target
        self.peer_requeues = peer_requeues

    def __call__(self) -> Any:
        """Run (or continue) training on this task; returns the trainer's RunResult."""
        env = job_dist_env()
        export_dist_env(env)
        if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):  # a job process of our own
            setup_logging(env)
        requeue = _submitit_requeue_handler()
        if requeue is not None and env.is_main:
            on_peer_lost(lambda report: self._requeue_for_lost_peer(requeue, report))
        try:
            result = resolve_target(self.target)(self.cfg, env)
        except Exception as e:
            if isinstance(e, _trainer_input_errors()):
                first = (str(e).strip().splitlines() or [""])[0]
                raise TrainerInputError(f"{type(e).__name__}: {first}") from e
            if isinstance(e, PeerLostError) and requeue is not None and env.is_main:
                self._requeue_for_lost_peer(requeue, str(e))  # exits when the requeue was asked for
            raise  # anything else is a bug: its traceback stays as it is
        finally:
            on_peer_lost(None)
        if getattr(result, "status", None) == "preempted" and requeue is not None:
            log.warning("run %s preempted at step %s: requeueing", self.cfg.run.name, getattr(result, "step", "?"))
            try:
                # Rank 0: checkpoint() -> new pickle -> requeue -> exit. Other ranks: returns.
                requeue(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG), None)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                # SLURM may have requeued or cancelled the job itself (PreemptMode=REQUEUE, scancel).
                log.warning("requeue request failed (%s); the job ends here", e)
        return result

    def _requeue_for_lost_peer(self, requeue: Callable[[int, Any], None], report: str) -> None:
        """Rank 0 after a lost peer: requeue the job (and exit) while requeues are left."""
        if self.peer_requeues <= 0:
            log.error("%s; no requeue left for lost peers (--max-peer-requeues): the job ends here", report)
            return
        log.warning("%s; requeueing the job, which resumes from its last complete checkpoint "
                    "(%d requeue(s) for lost peers left after this one)", report, self.peer_requeues - 1)
        self._lost_peer = True
        try:
            requeue(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG), None)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            log.warning("requeue request failed (%s); the job ends here", e)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The resubmission submitit requeues: the same run, resuming from its latest checkpoint."""
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, resume="auto"))
        left = self.peer_requeues - (1 if self._lost_peer else 0)
        return submitit.helpers.DelayedSubmission(type(self)(cfg, self.target, peer_requeues=left))

    def __repr__(self) -> str:
        return f"TrainTask(run={self.cfg.run.dir}, target={self.target})"
