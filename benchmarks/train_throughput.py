"""Training throughput: samples/s, step-time breakdown, MFU and peak memory; ours vs open_clip_train.

``python -m benchmarks.train_throughput --models ViT-B-32 ViT-B-16 orbit-tiny --batch-size 256``

Per model, with our own model/loader/optimizer/engine builders (the trainer's hot path):

- ``compute``: one batch already on the device, ``engine.step`` in a loop;
- ``e2e``: batches from shards on local disk through ``train.data.batch`` + ``engine.step``;
- ``breakdown`` (``--breakdown``): the same ``engine.step`` cut into the phases the engine
  marks itself (:mod:`train.core.phases`: forward, loss, backward, collectives, optimizer)
  with CUDA events (perf_counter on CPU), plus the host's wait for the batch. Only this
  mode synchronizes (once per step, after it); the timed modes only at their two ends.

FLOPs of one step come from ``torch.utils.flop_counter.FlopCounterMode``; MFU divides the
achieved FLOP/s by ``--peak-flops`` (H100 bf16 dense) and, with ``--measure-peak``, also by
a measured matmul rate. ``--openclip MODEL ...`` runs open_clip_train on the same shards,
batch, precision and workers and reports ours/theirs (end to end).

Rows are written to the JSON as each finishes (:class:`benchmarks.report.Report`): a run
stopped by its time box, or a failing reference, keeps every finished row.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from benchmarks.bench_data import synthetic_shards
from benchmarks.flops import H100_BF16_DENSE, count_flops, measure_matmul_peak, mfu
from benchmarks.openclip_ref import ROOT
from benchmarks.procstats import peak_rss_bytes, reset_peak_rss
from benchmarks.report import Report
from train.core import phases
from train.core.phases import PHASES



def make_config(model: str, batch_size: int, shards: Path | None, workers: int, precision: str,
                accum_steps: int = 1, run_root: str | None = None, overrides: list[str] | None = None) -> Any:
    """A training config for the benchmark (shards source, plain AdamW, no eval/checkpoints),
    then ``overrides`` (dotted ``key=value``, as on the trainer's command line)."""
    from train.core.config import Config, ShardSourceConfig
    from train.core.configbase import apply_overrides, from_dict, to_dict

    cfg = Config()
    cfg.model.name = model
    cfg.data.batch_size, cfg.data.workers = batch_size, workers
    if shards is not None:
        cfg.data.shards = [ShardSourceConfig(path=str(shards))]
    cfg.train.precision, cfg.train.accum_steps = precision, accum_steps
    cfg.train.steps, cfg.train.progress = 10**6, False
    cfg.optim.warmup_steps = 10
    cfg.run.root = run_root or tempfile.mkdtemp(prefix="bench_run_")
    return from_dict(Config, apply_overrides(to_dict(cfg), overrides)) if overrides else cfg


class Setup:
    """Model, engine and (optionally) loader built the way the trainer builds them."""

    def __init__(self, cfg: Any, device: torch.device, with_loader: bool) -> None:
        from train.data import build_train_loader
        from train.core.distenv import dist_env_from
        from train.engines import EngineParts, build_engine
        from train.model.factory import build_model
        from train.optim.optimizer import build_optimizer
        from train.optim.schedule import build_scheduler

        self.cfg, self.device = cfg, device
        self.env = dist_env_from(os.environ)  # one rank of a torchrun child, or alone
        torch.manual_seed(0)
        self.bundle = build_model(cfg.model)
        model = self.bundle.model.to(device)
        optimizer = build_optimizer(model, cfg.optim)
        sched = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        self.engine = build_engine(cfg.train.engine, EngineParts.from_config(cfg, model, optimizer, sched, self.env, device))
        self.loader = None
        if with_loader:
            b = self.bundle
            self.loader = build_train_loader(cfg.data, cfg.train.seed, self.env, b.tokenizer, b.image_size, b.mean, b.std)

    def device_batch(self) -> Any:
        """A random batch already on the device (compute-only mode)."""
        from train.data.batch import Batch

        n, s = self.cfg.data.batch_size, self.bundle.image_size
        # Made on the device: a 65k x 224 px batch is 10 GB even as uint8, slow to make on a host.
        g = torch.Generator(device=self.device).manual_seed(0)
        ctx = self.bundle.tokenizer(["x"]).shape[1]
        images = torch.randint(0, 256, (n, 3, s, s), generator=g, device=self.device, dtype=torch.uint8)
        texts = torch.randint(1, 49000, (n, ctx), generator=g, device=self.device)
        return Batch(images, texts, [str(i) for i in range(n)])

    def host_batch(self) -> Any:
        """A random uint8 batch in host memory, as the loader hands it over (pinned on CUDA).

        The feature cache then copies one micro-batch at a time to the device and normalizes
        it there, so device memory no longer grows with the effective batch's inputs.
        """
        from train.data.batch import Batch

        n, s = self.cfg.data.batch_size, self.bundle.image_size
        g = torch.Generator().manual_seed(0)
        ctx = self.bundle.tokenizer(["x"]).shape[1]
        images = torch.empty(n, 3, s, s, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        for chunk in images.split(4096):  # fill in slices: one huge draw needs more memory
            chunk.random_(0, 256, generator=g)
        texts = torch.randint(1, 49000, (n, ctx), generator=g)
        return Batch(images, texts, [str(i) for i in range(n)])


def sync(device: torch.device) -> None:
    """Wait for queued device work (only at the ends of a timed region)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_gib(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak`: CUDA allocator peak, or process peak RSS on CPU."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return peak / 2**30


def timed_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


class PhaseTimer:
    """A :mod:`train.core.phases` listener: marks each phase's edges with CUDA events (or
    perf_counter on CPU); read the durations after the step (one synchronization)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []
        self._open: dict[str, Any] = {}

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def __call__(self, name: str, starting: bool) -> None:
        if starting:
            self._open[name] = self._mark()
        else:
            self.spans.append((name, self._open.pop(name), self._mark()))

    def durations_ms(self) -> dict[str, float]:
        """Milliseconds per phase, summed over its occurrences in the step."""
        if self.cuda:
            torch.cuda.synchronize()
        out = dict.fromkeys(PHASES, 0.0)
        for name, a, b in self.spans:
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
        return out


def timed_step(engine: Any, batches: Iterator, device: torch.device) -> dict[str, float]:
    """One real ``engine.step`` with its phases timed, plus the host's wait for the batch (ms)."""
    t0 = time.perf_counter()
    batch = next(batches)
    data_ms = (time.perf_counter() - t0) * 1e3
    timer = PhaseTimer(device)
    t1 = time.perf_counter()
    with phases.listening(timer):
        engine.step(batch)
    sync(device)
    step_ms = (time.perf_counter() - t1) * 1e3
    return {"data": data_ms, **timer.durations_ms(), "step": step_ms}


def breakdown(setup: Setup, steps: int, warmup: int) -> dict[str, float]:
    """Median ms per phase over ``steps`` timed steps from the shards (any engine, any accumulation)."""
    batches = iter(setup.loader)
    rows = [timed_step(setup.engine, batches, setup.device) for _ in range(warmup + steps)][warmup:]
    keys = ("data", *PHASES, "step")
    return {f"{k}_ms": sorted(r[k] for r in rows)[len(rows) // 2] for k in keys}


def mfu_cols(flops: float, steps_per_s: float, args: argparse.Namespace) -> dict[str, float]:
    """MFU against the nominal peak (``--peak-flops``) and, if measured, the matmul peak."""
    cols = {"mfu": mfu(flops, steps_per_s, args.peak_flops)}
    if args.measured_peak:
        cols["mfu_vs_measured"] = mfu(flops, steps_per_s, args.measured_peak)
    return cols


def bench_model(model: str, args: argparse.Namespace, shards: Path, device: torch.device, report: Report) -> None:
    """All requested modes for one model, each row added to ``report`` as it finishes."""
    precision = resolve_precision(args.precision, device)
    if args.repeats > 1 or args.nproc > 1:  # the side-by-side comparison: fresh processes, interleaved
        compare_e2e(model, args, shards, device, precision, report)
        return
    cfg = make_config(model, args.batch_size, shards, args.workers, precision)
    setup = Setup(cfg, device, with_loader="e2e" in args.modes or args.breakdown)
    engine, n = setup.engine, args.batch_size
    gpu_batch = setup.device_batch()
    flops = count_flops(lambda: engine.step(gpu_batch))
    base = {"model": model, "batch": n, "precision": precision, "image_size": setup.bundle.image_size,
            "gflops_per_step": flops / 1e9}
    e2e_rate = None
    if "compute" in args.modes:
        reset_peak(device)
        secs = timed_steps(lambda: engine.step(gpu_batch), args.warmup, args.steps, device)
        report.add({**base, "mode": "compute", "samples_per_s": n * args.steps / secs,
                    "step_ms": secs / args.steps * 1e3, **mfu_cols(flops, args.steps / secs, args),
                    "peak_mem_gib": peak_gib(device)})
    if "e2e" in args.modes:
        batches = iter(setup.loader)
        reset_peak(device)
        wait0 = setup.loader.wait_seconds
        secs = timed_steps(lambda: engine.step(next(batches)), args.warmup, args.steps, device)
        e2e_rate = n * args.steps / secs
        report.add({**base, "mode": "e2e", "samples_per_s": e2e_rate,
                    "step_ms": secs / args.steps * 1e3, **mfu_cols(flops, args.steps / secs, args),
                    "peak_mem_gib": peak_gib(device),
                    "data_wait_ms": (setup.loader.wait_seconds - wait0) / (args.warmup + args.steps) * 1e3})
        del batches
    if args.breakdown:
        report.add({**base, "mode": "breakdown", **breakdown(setup, max(3, args.steps // 2), 2)})
    del setup, engine, gpu_batch
    if model in args.openclip:
        try:
            for row in reference_rows(model, args, shards, device, base, e2e_rate):
                report.add(row)
        except Exception as e:  # the reference failing must not cost our rows
            report.add({**base, "mode": "open_clip_train e2e", "status": "failed",
                        "error": (str(e).strip().splitlines() or [repr(e)])[-1][:300]})


def reference_rows(model: str, args: argparse.Namespace, shards: Path, device: torch.device, base: dict,
                   ours_e2e: float | None) -> list[dict]:
    """open_clip_train on the same workload, plus the ours/theirs row."""
    from benchmarks.openclip_train import run_openclip_train

    ref = run_openclip_train(shards, model, args.batch_size, args.warmup + args.steps, args.warmup,
                             THEIR_PRECISION[base["precision"]], args.workers, device.type,
                             log_every=args.log_every)
    theirs = ref["samples_per_s"]
    rows = [{**base, "mode": "open_clip_train e2e", "samples_per_s": theirs,
             "step_ms": args.batch_size / theirs * 1e3,
             **mfu_cols(base["gflops_per_step"] * 1e9, theirs / args.batch_size, args)}]
    if ours_e2e is not None:
        rows.append({**base, "mode": "ratio ours/open_clip (e2e)", "samples_per_s": ours_e2e / theirs})
    return rows


THEIR_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
"""Our ``train.precision`` -> open_clip_train's ``--precision`` (both: autocast of the towers)."""


def resolve_device(choice: str) -> torch.device:
    """``--device``: ``auto`` is CUDA where there is one."""
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_precision(choice: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA, fp32 on CPU (a benchmark must not depend on the CPU's bf16 support)."""
    return choice if choice != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def child_env(nproc: int) -> dict[str, str]:
    """Environment of one side's process(es): this checkout importable, the cores split evenly."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a caller's own rank must not leak into the side's processes
    return env


def run_ours_e2e(model: str, args: argparse.Namespace, shards: Path, precision: str) -> dict:
    """Ours end to end in fresh process(es) (torchrun for ``--nproc`` > 1); rank 0's measurement."""
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="ours_e2e_") as tmp:
        out = Path(tmp) / "rate.json"
        launcher = [sys.executable] if args.nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
        cmd = [*launcher, "-m", "benchmarks.train_throughput", "--child-e2e", str(out), "--models", model,
               "--shards", str(shards), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--workers", str(args.workers), "--precision", precision,
               "--device", args.device, *[x for o in args.ours for x in ("--ours", o)]]
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(args.nproc), capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"ours failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        return json.loads(out.read_text())


def child_e2e(args: argparse.Namespace) -> int:
    """``--child-e2e``: one rank's timed end-to-end steps; rank 0 writes the global rate."""
    import json

    from train.core.distenv import dist_env_from
    from train.trainer import process_group

    device = resolve_device(args.device)
    cfg = make_config(args.models[0], args.batch_size, Path(args.shards), args.workers, args.precision,
                      overrides=args.ours)
    cfg.train.device = device.type
    env = dist_env_from(os.environ)
    with process_group(env, device):
        setup = Setup(cfg, device, with_loader=True)
        batches = iter(setup.loader)
        secs = timed_steps(lambda: setup.engine.step(next(batches)), args.warmup, args.steps, device)
        if env.rank == 0:
            n = args.batch_size * env.world_size * args.steps
            Path(args.child_e2e).write_text(json.dumps({
                "samples_per_s": n / secs, "step_ms": secs / args.steps * 1e3, "peak_mem_gib": peak_gib(device),
                "data_wait_ms": setup.loader.wait_seconds / (args.warmup + args.steps) * 1e3}))
    return 0


def compare_e2e(model: str, args: argparse.Namespace, shards: Path, device: torch.device, precision: str,
                report: Report) -> None:
    """Ours and open_clip_train end to end, ``--repeats`` interleaved runs each (fresh processes,
    ``--nproc`` ranks), a row per run, then the medians and their ratio."""
    from benchmarks.openclip_train import run_openclip_train

    base = {"model": model, "batch": args.batch_size, "nproc": args.nproc, "precision": precision,
            **({"ours_overrides": " ".join(args.ours)} if args.ours else {})}
    os.environ["OMP_NUM_THREADS"] = child_env(args.nproc)["OMP_NUM_THREADS"]  # theirs the same threads as ours
    rates: dict[str, list[float]] = {"ours": [], "open_clip_train": []}
    for r in range(args.repeats):
        ours = run_ours_e2e(model, args, shards, precision)
        rates["ours"].append(ours["samples_per_s"])
        report.add({**base, "mode": "ours e2e", "repeat": r, **ours})
        if model in args.openclip:
            theirs = run_openclip_train(shards, model, args.batch_size, args.warmup + args.steps, args.warmup,
                                        THEIR_PRECISION[precision], args.workers, device.type,
                                        log_every=args.log_every, nproc=args.nproc)
            rates["open_clip_train"].append(theirs["samples_per_s"])
            report.add({**base, "mode": "open_clip_train e2e", "repeat": r, "samples_per_s": theirs["samples_per_s"]})
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    for k, v in med.items():
        report.add({**base, "mode": f"{k} e2e median", "samples_per_s": v,
                    "range": f"{min(rates[k]):.1f}-{max(rates[k]):.1f}"})
    if len(med) == 2:
        report.add({**base, "mode": "ratio ours/open_clip (medians)", "samples_per_s": med["ours"] / med["open_clip_train"]})


def main(argv: list[str] | None = None) -> int:
    """CLI entry: build/reuse synthetic shards, run each model, print the table, write JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16", "orbit-tiny"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each timed mode")
    p.add_argument("--modes", nargs="+", choices=["compute", "e2e"], default=["compute", "e2e"])
    p.add_argument("--breakdown", action="store_true", help="also run the instrumented (synchronizing) breakdown")
    p.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    p.add_argument("--shards", help="a shards output folder; default: build synthetic ones")
    p.add_argument("--shard-image-size", type=int, default=224)
    p.add_argument("--count", type=int, help="synthetic scenes (default: enough for every timed step)")
    p.add_argument("--openclip", nargs="*", default=["ViT-B-32"], help="models to also run through open_clip_train")
    p.add_argument("--log-every", type=int, default=5, help="open_clip_train --log-every-n-steps")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE, help="MFU denominator (FLOP/s)")
    p.add_argument("--measure-peak", action="store_true", help="also report MFU against a measured matmul peak")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="ours train.precision, theirs fp32/amp_bf16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--repeats", type=int, default=1,
                   help="> 1: end to end only, ours and open_clip_train in fresh processes, interleaved; medians")
    p.add_argument("--nproc", type=int, default=1, help="processes per side (torchrun; e2e comparison only)")
    p.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for our side of the side-by-side runs (a lever's row, e.g. train.compile=true); repeatable")
    p.add_argument("--child-e2e", help=argparse.SUPPRESS)  # one side's run, started by --repeats/--nproc
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "train_throughput.json"))
    a = p.parse_args(argv)
    if a.child_e2e:
        return child_e2e(a)
    if a.repeats < 1 or a.nproc < 1:
        p.error("--repeats and --nproc must be >= 1")
    device = resolve_device(a.device)
    if a.shards:
        shards = Path(a.shards)
    else:
        # e2e and breakdown each consume (warmup + steps) batches; open_clip one epoch of them.
        needed = a.batch_size * (a.warmup + a.steps) * 3
        shards = synthetic_shards(a.count or needed, a.shard_image_size, shard_size=max(16, math.ceil(needed / 64)),
                                  workers=a.workers)
    a.measured_peak = None
    if a.measure_peak:
        a.measured_peak = measure_matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    report = Report(a.out, "train_throughput", shards=str(shards), device=str(device), steps=a.steps,
                    warmup=a.warmup, workers=a.workers, repeats=a.repeats, nproc=a.nproc, peak_flops=a.peak_flops, measured_peak=a.measured_peak)
    try:
        for m in a.models:
            bench_model(m, a, shards, device, report)
    except BaseException as e:
        report.fail(e)
        raise
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
