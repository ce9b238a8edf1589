"""Run open_clip's own trainer (``python -m open_clip_train.main``) as the reference.

It runs in :func:`benchmarks.openclip_ref.ref_env` (webdataset 0.2.86 + pandas) on the
same shards, batch size and precision as ours. A ``sitecustomize.py`` in a temp folder
first on PYTHONPATH makes torchvision importable next to a CPU torch, registers our
``configs/models/*.json`` (orbit-tiny, ...) in that process, and lets its DDP run on CPU
(open_clip_train passes ``device_ids=[cpu]``, which DDP rejects). Throughput comes from its
``Train Epoch: ... Batch (t): AVG`` log lines, skipping the warm-up steps.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_data import shard_urls
from benchmarks.openclip_ref import ROOT, ref_env

_SITECUSTOMIZE = """\
import sys
sys.path.insert(0, {root!r})
import train.core.compat
train.core.compat.ensure_torchvision()
import open_clip
open_clip.add_model_config({models!r})
# open_clip_train hands DDP device_ids=[device] even on CPU, which DDP refuses: drop them there
# (what a CPU user of several processes must patch; nothing else changes).
import torch.nn.parallel as _par
_ddp_init = _par.DistributedDataParallel.__init__
def _cpu_ddp_init(self, module, device_ids=None, *args, **kwargs):
    if device_ids and all(getattr(d, "type", d) == "cpu" for d in device_ids):
        device_ids = None
    _ddp_init(self, module, device_ids, *args, **kwargs)
_par.DistributedDataParallel.__init__ = _cpu_ddp_init
"""
_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): ([0-9.]+)")


def parse_log(text: str, batch_size: int, warmup_steps: int) -> dict:
    """Steady-state samples/s from open_clip_train's log.

    Each log line reports samples seen so far and the mean step time since the previous
    line; intervals that start before ``warmup_steps`` are left out.

    Raises:
        ValueError: no interval after the warm-up was logged.
    """
    points = [(int(n), float(t)) for n, t in _LINE.findall(text)]
    samples = seconds = 0.0
    for (n0, _), (n1, avg) in zip(points, points[1:]):
        steps = (n1 - n0) / batch_size
        if n0 / batch_size >= warmup_steps and steps > 0:
            samples += n1 - n0
            seconds += steps * avg
    if seconds <= 0:
        raise ValueError(f"no timed interval after {warmup_steps} warm-up steps in {len(points)} log lines")
    return {"samples": int(samples), "seconds": seconds, "samples_per_s": samples / seconds,
            "log_lines": len(points)}


def run_openclip_train(shards: Path, model: str, batch_size: int, steps: int, warmup_steps: int,
                       precision: str, workers: int, device: str, log_every: int = 5,
                       timeout: float = 1800, nproc: int = 1) -> dict:
    """Train ``model`` for ``steps`` steps with open_clip_train; return its measured rate.

    Args:
        shards: A shards output folder (its train split).
        model: open_clip model name (ours from configs/models are registered).
        batch_size: Per-process batch.
        steps: Steps to run (``--train-num-samples`` = steps x batch, one epoch).
        warmup_steps: Leading steps left out of the rate.
        precision: open_clip's ``--precision`` (``amp_bf16`` on GPU, ``fp32`` on CPU).
        workers: DataLoader workers.
        device: ``cuda`` or ``cpu``.
        log_every: ``--log-every-n-steps`` (the rate's resolution).
        nproc: processes (torchrun, ``--standalone``); the rate is then the global one.

    Raises:
        RuntimeError: the trainer failed or logged no usable interval.
    """
    pattern, available = shard_urls(shards)
    if steps * batch_size * nproc > available:
        raise ValueError(f"{steps} steps x {batch_size} x {nproc} process(es) need {steps * batch_size * nproc} samples, "
                         f"shards have {available}")
    with tempfile.TemporaryDirectory(prefix="openclip_ref_") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(root=str(ROOT), models=str(ROOT / "configs" / "models")))
        env = ref_env()
        env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
        env.setdefault("OMP_NUM_THREADS", "1")
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        cmd = [
            *launcher, "-m", "open_clip_train.main",
            "--train-data", pattern, "--train-num-samples", str(steps * batch_size * nproc),
            "--dataset-type", "webdataset", "--batch-size", str(batch_size), "--precision", precision,
            "--workers", str(workers), "--model", model, "--epochs", "1", "--log-every-n-steps", str(log_every),
            "--device", device, "--report-to", "", "--save-frequency", "0", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--warmup", "10", "--lr", "1e-4", "--seed", "0",
            "--name", "ref",  # logs in ./logs of cwd=tmp (torchrun would take "--logs" for its own --logs-specs)
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train failed (rc={proc.returncode}):\n{text[-4000:]}")
    try:
        result = parse_log(text, batch_size * nproc, warmup_steps)
    except ValueError as e:
        raise RuntimeError(f"open_clip_train: {e}; log tail:\n{text[-3000:]}") from e
    return {**result, "wall_s_total": wall, "command": " ".join(cmd)}
