"""Training metrics: cross-rank reduction, TensorBoard, a progress bar, NaN/inf stops.

Step outputs stay on the device until a log step: then the window's values are
stacked, all-reduced once (mean over ranks) and read with a single ``.tolist()``,
so there is no host sync per step. The NaN/inf check runs on the reduced per-step
losses at each flush (and before every checkpoint), so every rank stops at the
same step, naming that step and its batch's sample keys.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from train.configbase import to_dict
from train.distenv import DistEnv

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the batch keys."""


def flatten_config(cfg: Any) -> dict[str, bool | int | float | str]:
    """Dotted-key scalar view of a config, for TensorBoard's hparams table."""
    out: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (bool, int, float, str)):
            out[prefix] = node
        else:  # None, lists: hparams only takes scalars
            out[prefix] = str(node)

    walk("", to_dict(cfg))
    return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory on ``device``, or the process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def reduce_values(values: torch.Tensor, env: DistEnv, op: str = "mean") -> list[float]:
    """All-reduce a 1-D tensor across ranks (``mean`` or ``max``) and read it once."""
    if env.distributed and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            values /= env.world_size
    return values.tolist()


class MetricLogger:
    """Collects step outputs and logs them every ``log_every`` steps.

    Args:
        run_dir: TensorBoard events go to ``run_dir/tb`` (rank 0 only).
        env: where this process sits.
        device: where step outputs live (for the reduction and peak memory).
        total_steps: run length (progress bar, forced final log).
        start_step: steps already done (resume).
        log_every: steps per reduction/log line.
        global_batch: samples per optimizer step over all ranks (samples/s).
        progress: show a tqdm bar on rank 0.
        check_finite: stop on a NaN/inf loss.
    """

    def __init__(
        self,
        run_dir: str | Path,
        env: DistEnv,
        device: torch.device,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 10,
        global_batch: int = 1,
        progress: bool = True,
        check_finite: bool = True,
    ):
        if log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {log_every}")
        self.env, self.device = env, device
        self.total_steps, self.log_every, self.global_batch = total_steps, log_every, global_batch
        self.check_finite = check_finite
        self._outputs: list[dict[str, torch.Tensor]] = []
        self._steps: list[int] = []
        self._keys: list[list[str]] = []
        self._wait = 0.0
        self._lr: float | None = None
        self._t0 = time.perf_counter()
        self.last: dict[str, float] = {}
        self.writer = None
        self.bar = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            if progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log_hparams(self, cfg: Any) -> None:
        """Write the flattened config to TensorBoard's hparams table (rank 0)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        # Written into the run's own event file (add_hparams would make a sub-run per call).
        metrics = {"train/loss": 0.0, "train/logit_scale": 0.0}
        for summary in hparams(flatten_config(cfg), metrics):
            self.writer.file_writer.add_summary(summary)

    def record(
        self, step: int, outputs: Mapping[str, Any], keys: list[str], data_wait: float, lr: float | None = None
    ) -> None:
        """Keep one step's outputs (no host sync); flush on log steps and the last step.

        ``lr`` is logged only when the engine's outputs carry no ``lr`` of their own.
        """
        if "loss" not in outputs:
            raise KeyError(f"engine.step must return a 'loss' entry, got {sorted(outputs)}")
        self._outputs.append({k: torch.as_tensor(v).detach().float().reshape(()) for k, v in outputs.items()})
        self._steps.append(step)
        self._keys.append(list(keys))
        self._wait += data_wait
        self._lr = lr
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every == 0 or step >= self.total_steps:
            self.flush()

    def flush(self) -> dict[str, float]:
        """Reduce and log the pending window (collective: call on every rank at the same step).

        Raises:
            NonFiniteLossError: a step in the window had a NaN/inf loss (on any rank).
        """
        if not self._outputs:
            return self.last
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        names = sorted(self._outputs[0])
        n = len(self._outputs)
        per_step = torch.stack([torch.stack([o[k] for k in names]) for o in self._outputs])  # [n, keys]
        wait = torch.tensor([self._wait / elapsed], device=per_step.device)
        # Per-step losses ride along so one collective gives both the means and the NaN check.
        vec = torch.cat([per_step.mean(0), per_step[:, names.index("loss")], wait.to(per_step.dtype)])
        reduced = reduce_values(vec, self.env, "mean")
        peak = reduce_values(torch.tensor([peak_memory_gb(self.device)]), self.env, "max")[0]
        means, losses = reduced[: len(names)], reduced[len(names) : len(names) + n]
        step, steps, keys = self._steps[-1], self._steps, self._keys
        self._outputs, self._steps, self._keys, self._wait = [], [], [], 0.0
        self._t0 = time.perf_counter()
        if self.check_finite:
            for i, value in enumerate(losses):
                if not torch.isfinite(torch.tensor(value)):
                    shown = ", ".join(keys[i][:16]) + (" ..." if len(keys[i]) > 16 else "")
                    raise NonFiniteLossError(
                        f"non-finite loss ({value}) at step {steps[i]}; batch keys on rank {self.env.rank}: [{shown}]"
                    )
        self.last = dict(zip(names, means))
        if self._lr is not None and "lr" not in self.last:
            self.last["lr"] = self._lr
        self.last.update(
            samples_per_s=self.global_batch * n / elapsed,
            data_wait_frac=reduced[-1],
            peak_mem_gb=peak,
        )
        self._write(step, self.last, "train")
        if self.env.is_main:
            line = " | ".join(f"{k} {v:.4g}" for k, v in self.last.items())
            log.info("step %d/%d | %s", step, self.total_steps, line)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", refresh=False)
        return self.last

    def log_eval(self, step: int, results: Mapping[str, float]) -> None:
        """Write evaluation results under ``eval/`` (rank 0)."""
        self._write(step, results, "eval")
        if self.env.is_main and results:
            log.info("eval at step %d | %s", step, " | ".join(f"{k} {v:.4g}" for k, v in results.items()))

    def _write(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        """Close the progress bar and the event file."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
