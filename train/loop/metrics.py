"""Training metrics: cross-rank reduction, TensorBoard, a progress bar, non-finite steps.

Step outputs stay on the device until a log step: then the window's per-step values are
stacked, reduced over ranks in one collective and read on the host once, so there is no
host sync per step. Flags that every rank must agree on (a stop request) ride along in the
same flush. A step whose loss or gradient was not finite was already skipped on the device
by the engine; the flush counts such steps and stops the run (every rank at the same
step, naming the step and its batch's sample keys) after ``max_nonfinite`` in a row.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from typing import Any, Mapping

import torch

from train.core.collectives import Comm
from train.core.configbase import ConfigError, to_dict
from train.core.rundir import RunDir

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the message names the steps and the batch keys."""


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
    """Peak allocated CUDA memory on ``device`` (allocator statistics, no sync), or the
    process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class MetricLogger:
    """Collects step outputs and logs them every ``log_every`` steps.

    Args:
        run: TensorBoard events go to ``run.tb`` (rank 0 only).
        comm: the job's collectives (the one reduction per flush goes through it).
        device: where step outputs live (peak memory is read for it).
        total_steps: run length (progress bar, forced final log).
        start_step: steps already done (resume).
        log_every: steps per reduction/log line.
        global_batch: samples per optimizer step over all ranks (samples/s).
        progress: show a tqdm bar on rank 0.
        max_nonfinite: stop after this many non-finite steps in a row (0 = never stop).
    """

    def __init__(
        self,
        run: RunDir,
        comm: Comm,
        device: torch.device,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 10,
        global_batch: int = 1,
        progress: bool = True,
        max_nonfinite: int = 1,
    ):
        if log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {log_every}")
        self.comm, self.device = comm, device
        self.total_steps, self.log_every, self.global_batch = total_steps, log_every, global_batch
        self.max_nonfinite = max_nonfinite
        self._outputs: list[dict[str, torch.Tensor]] = []
        self._steps: list[int] = []
        self._keys: list[list[str]] = []
        self._wait = 0.0
        self._t0 = time.perf_counter()
        self._bad_run: list[tuple[int, list[str]]] = []
        self.skipped_steps = 0
        self.last: dict[str, float] = {}
        self.writer = None
        self.bar = None
        if comm.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.tb))
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

    def due(self, step: int) -> bool:
        """Whether ``step`` is a log step (every rank flushes at the same steps)."""
        return step % self.log_every == 0 or step >= self.total_steps

    def record(self, step: int, outputs: Mapping[str, Any], keys: list[str], data_wait: float) -> None:
        """Keep one step's outputs (no host sync); :meth:`flush` reduces them."""
        if "loss" not in outputs:
            raise KeyError(f"engine.step must return a 'loss' entry, got {sorted(outputs)}")
        self._outputs.append({k: torch.as_tensor(v).detach().float().reshape(()) for k, v in outputs.items()})
        self._steps.append(step)
        self._keys.append(list(keys))
        self._wait += data_wait
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, flags: Mapping[str, bool] | None = None) -> dict[str, bool]:
        """Reduce and log the pending window (collective: every rank, same step).

        Args:
            flags: booleans every rank must agree on (e.g. ``{"stop": requested}``).

        Returns:
            The flags OR-ed over ranks.

        Raises:
            NonFiniteLossError: ``max_nonfinite`` non-finite steps in a row (every rank raises).
        """
        flags = dict(flags or {})
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        agreed = self._reduce_flags(flags)
        peak = agreed.pop("_peak_mem_gb")
        if not self._outputs:
            return agreed
        names = sorted(self._outputs[0])
        n = len(self._outputs)
        per_step = torch.stack([torch.stack([o[k] for k in names]) for o in self._outputs])  # [n, keys]
        wait = torch.full((1,), self._wait / elapsed, device=per_step.device)
        values = self.comm.read(self.comm.all_reduce(torch.cat([per_step.reshape(-1), wait]), "mean"))
        rows = [dict(zip(names, values[i * len(names):(i + 1) * len(names)])) for i in range(n)]
        steps, keys = self._steps, self._keys
        self._outputs, self._steps, self._keys, self._wait = [], [], [], 0.0
        self._t0 = time.perf_counter()
        self._check_finite(rows, steps, keys)
        good = [r for r in rows if self._finite(r)]  # skipped steps stay out of the means
        means = {k: sum(r[k] for r in good) / len(good) for k in names if k != "finite"} if good else {}
        self.last = {**means, "samples_per_s": self.global_batch * n / elapsed, "data_wait_frac": values[-1],
                     "peak_mem_gb": peak, "skipped_steps": float(self.skipped_steps)}
        self._write(steps[-1], self.last, "train")
        if self.comm.rank == 0:
            line = " | ".join(f"{k} {v:.4g}" for k, v in self.last.items())
            log.info("step %d/%d | %s", steps[-1], self.total_steps, line)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{self.last.get('loss', float('nan')):.4f}", refresh=False)
        return agreed

    def _reduce_flags(self, flags: dict[str, bool]) -> dict[str, Any]:
        names = sorted(flags)
        vec = torch.tensor([peak_memory_gb(self.device)] + [1.0 if flags[k] else 0.0 for k in names])
        out = self.comm.read(self.comm.all_reduce(vec, "max"))
        return {"_peak_mem_gb": out[0], **{k: v > 0 for k, v in zip(names, out[1:])}}

    @staticmethod
    def _finite(row: Mapping[str, float]) -> bool:
        return row.get("finite", 1.0) > 0.5 and math.isfinite(row["loss"])

    def _check_finite(self, rows: list[dict[str, float]], steps: list[int], keys: list[list[str]]) -> None:
        for row, step, k in zip(rows, steps, keys):
            if self._finite(row):
                self._bad_run = []
                continue
            self.skipped_steps += 1
            self._bad_run.append((step, k))
            log.warning("non-finite loss/gradient at step %d (loss %s): update skipped", step, row["loss"])
            if self.max_nonfinite and len(self._bad_run) >= self.max_nonfinite:
                first, first_keys = self._bad_run[0]
                shown = ", ".join(first_keys[:16]) + (" ..." if len(first_keys) > 16 else "")
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at {len(self._bad_run)} step(s) in a row, from step {first} "
                    f"(loss {row['loss']}); batch keys of step {first} on rank {self.comm.rank}: [{shown}]"
                )

    def log_eval(self, step: int, results: Mapping[str, float]) -> None:
        """Write evaluation results under ``eval/`` (rank 0)."""
        self._write(step, results, "eval")
        if self.comm.rank == 0 and results:
            log.info("eval at step %d | %s", step, " | ".join(f"{k} {v:.4g}" for k, v in results.items()))

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """An HWC uint8 array (or a PIL image) under ``tag`` (rank 0)."""
        if self.writer is None:
            return
        import numpy as np

        self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        self.writer.flush()

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
