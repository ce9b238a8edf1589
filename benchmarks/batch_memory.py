"""Peak memory and step time vs effective batch through the micro-batch feature cache.

``python -m benchmarks.batch_memory --model ViT-B-32 --micro 512 --batches 1024 ... 65536``

For each effective batch ``N`` one process runs ``engine.step`` with
``train.accum_steps = N / micro``, so the towers only ever see ``micro`` samples with
grad while the contrastive loss spans all ``N`` (see ``train/gradcache.py``). The batch
stays in (pinned) host memory by default, as the loader hands it over, and the cache
copies one micro-batch at a time to the device (copy time included in the step);
``--batch-on device`` puts the whole batch on the device first (copy time excluded,
but the inputs alone of 65k x 224 px take 37 GiB). Peak memory: CUDA allocator peak
on GPU, process peak RSS on CPU.

Each size runs in a fresh process (``--one N``): torch's pinned-host allocator keeps its
power-of-two blocks until the process ends, so sizes measured in one process would pile up
(63 GiB pinned after 1k..32k), and an out-of-memory kill of one size must not take the
others' rows with it. Rows reach the JSON as each size finishes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch

from benchmarks.openclip_ref import ROOT
from benchmarks.procstats import current_rss_bytes
from benchmarks.report import Report
from benchmarks.train_throughput import Setup, make_config, peak_gib, reset_peak, sync, timed_steps

GIB_TARGET = 60.0


def in_use_gib(device: torch.device) -> float:
    """Memory held now: CUDA allocated bytes, or process RSS on CPU."""
    used = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()
    return used / 2**30


def measure(model: str, batch: int, micro: int, steps: int, warmup: int, device: torch.device,
            batch_on: str = "host") -> dict:
    """Peak memory and mean step time of one effective batch size."""
    if batch % micro:
        raise ValueError(f"effective batch {batch} is not a multiple of the micro-batch {micro}")
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = make_config(model, batch, None, 0, precision, accum_steps=batch // micro)
    row = {"model": model, "effective_batch": batch, "micro_batch": micro, "accum_steps": batch // micro,
           "precision": precision, "batch_on": batch_on}
    setup = None
    try:
        setup = Setup(cfg, device, with_loader=False)
        data = setup.host_batch() if batch_on == "host" else setup.device_batch()
        reset_peak(device)
        before = in_use_gib(device)  # model, optimizer state, the batch
        secs = timed_steps(lambda: setup.engine.step(data), warmup, steps, device)
        peak = peak_gib(device)
        row.update(step_s=secs / steps, samples_per_s=batch * steps / secs, peak_mem_gib=peak,
                   step_extra_gib=peak - before)
        row["status"] = "ok" if device.type != "cuda" or row["peak_mem_gib"] < GIB_TARGET else f">= {GIB_TARGET} GiB"
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        row.update(status="OOM", error=(str(e).splitlines() or [repr(e)])[0])
    except RuntimeError as e:  # pinned-host or allocator failures are plain RuntimeErrors
        row.update(status="failed", error=(str(e).splitlines() or [repr(e)])[0][:300])
    finally:
        del setup
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            sync(device)
    return row


def planned(model: str, batch: int, micro: int, device: torch.device) -> dict:
    """What ``python -m train plan`` predicts for this size (the planner counts the same step).

    On CUDA the device peak is the comparable figure (the batch waits on the host); on CPU the
    process also holds the batch, so the plan's device peak plus one batch.
    """
    from train.loop.plan import plan_step

    precision = "bf16" if device.type == "cuda" else "fp32"
    plan = plan_step(make_config(model, batch, None, 0, precision, accum_steps=batch // micro), 1, device)
    gib = (plan.device_peak + (plan.batch_bytes if device.type == "cpu" else 0)) / 2**30
    return {"planned_gib": gib, "planned_how": "extrapolated" if plan.extrapolated_from else "counted"}


def measure_in_child(args: argparse.Namespace, batch: int, timeout: float,
                     meanwhile: Callable[[], dict] | None = None) -> dict:
    """:func:`measure` for one size in a fresh process (see the module docstring); ``meanwhile``
    runs here while the child measures (the planner: CPU work beside the GPU's)."""
    cmd = [sys.executable, "-m", "benchmarks.batch_memory", "--one", str(batch), "--model", args.model,
           "--micro", str(args.micro), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--batch-on", args.batch_on]
    base = {"model": args.model, "effective_batch": batch, "micro_batch": min(args.micro, batch)}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    extra = meanwhile() if meanwhile is not None else {}
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {**base, "status": f"timed out after {timeout:.0f} s", **extra}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed (out of host memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        tail = (err.strip().splitlines() or [""])[-1][:300]
        return {**base, "status": why, "error": tail, **extra}
    return {**json.loads(lines[-1]), **extra}


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one row per effective batch size, printed as a table and written as JSON."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32" if gpu else "orbit-micro")
    p.add_argument("--micro", type=int, default=512 if gpu else 64, help="micro-batch size (fixed)")
    p.add_argument("--batches", type=int, nargs="+",
                   default=[1024 * 2**k for k in range(7)] if gpu else [64, 128, 256, 512, 1024],
                   help="effective batch sizes")
    p.add_argument("--steps", type=int, default=2, help="timed steps per size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-on", default="host", choices=["host", "device"],
                   help="where the effective batch waits before the step (default: host, as from the loader)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per size")
    p.add_argument("--plan", action="store_true", help="the memory planner's prediction beside each size")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: measure one size, print its row
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "batch_memory.json"))
    a = p.parse_args(argv)
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and gpu) else "cpu")
    if a.one is not None:
        print(json.dumps(measure(a.model, a.one, min(a.micro, a.one), a.steps, a.warmup, device, a.batch_on)))
        return 0
    report = Report(a.out, "batch_memory", device=str(device), target_gib=GIB_TARGET,
                    memory="cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM), one process per size",
                    planned="python -m train plan's device peak (+ the batch on CPU), counted in this process" if a.plan
                    else None)
    for n in a.batches:
        plan = (lambda n=n: planned(a.model, n, min(a.micro, n), device)) if a.plan else None
        row = measure_in_child(a, n, a.timeout, plan)
        if a.plan and row.get("peak_mem_gib") and row.get("planned_gib"):
            row["measured_vs_planned"] = row["peak_mem_gib"] / row["planned_gib"]
        report.add(row)
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
