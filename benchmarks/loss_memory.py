"""Peak memory and time of one contrastive-loss forward + backward: plain vs tiled.

``python -m benchmarks.loss_memory --sizes 4096 8192 ... 131072 --dim 128``

Each (loss, N) row runs in a fresh process (``--one``), so peaks do not mix and an
out-of-memory kill costs one row: it makes ``N x D`` unit features (image, text), notes the
memory in use, resets the peak, runs the loss's forward and backward once (after a warm-up
at a small size) and reports the peak above the inputs: on CPU the process's peak RSS
(VmHWM), on CUDA ``max_memory_allocated``. The plain loss (the reference of the tests) is
skipped where its ``~4 N^2`` fp32 logits and softmax cannot fit the machine's memory (the
row says so). Rows reach the JSON as each finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.openclip_ref import ROOT
from benchmarks.procstats import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from benchmarks.report import Report

TARGET_GIB = 1.0
"""Goal at N = 131,072 (D = 128) on CPU: the tiled loss within 1 GiB above its inputs."""


def plain_need_bytes(n: int) -> int:
    """What the plain loss holds at its peak: both directions' logits and log-softmax, fp32."""
    return 4 * n * n * 4


def available_bytes() -> int:
    """Memory the machine could give a process now (MemAvailable), or a large number."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def measure(kind: str, impl: str, n: int, dim: int, block: int, device: torch.device) -> dict:
    """One forward + backward; peak memory above the inputs (GiB) and seconds."""
    from train.objective.loss import ClipLoss, SigLipLoss
    from train.objective.tiled import TiledClipLoss, TiledSigLipLoss

    if impl == "tiled":
        loss_fn = (TiledClipLoss if kind == "clip" else TiledSigLipLoss)(block)
    else:
        loss_fn = ClipLoss() if kind == "clip" else SigLipLoss()

    def inputs(size: int) -> list[torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(size)
        img = torch.nn.functional.normalize(torch.randn(size, dim, generator=g, device=device), dim=1)
        txt = torch.nn.functional.normalize(torch.randn(size, dim, generator=g, device=device), dim=1)
        return [img.requires_grad_(), txt.requires_grad_(), torch.tensor(14.0, device=device, requires_grad=True),
                torch.tensor(-5.0, device=device, requires_grad=True)]

    loss_fn(*inputs(min(n, 256))).backward()  # warm-up: kernels, allocator, thread pool
    xs = inputs(n)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = current_rss_bytes()
    t0 = time.perf_counter()
    loss = loss_fn(*xs)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"loss": kind, "impl": impl, "n": n, "dim": dim, "block": block if impl == "tiled" else None,
            "status": "ok", "seconds": secs, "peak_above_inputs_gib": (peak - before) / 2**30,
            "inputs_gib": 2 * n * dim * 4 / 2**30, "value": float(loss.detach())}


def measure_in_child(kind: str, impl: str, n: int, args: argparse.Namespace) -> dict:
    """:func:`measure` in a fresh process (see the module docstring)."""
    base = {"loss": kind, "impl": impl, "n": n, "dim": args.dim}
    if impl == "plain" and args.device != "cuda" and plain_need_bytes(n) > 0.8 * available_bytes():
        return {**base, "status": f"skipped: needs ~{plain_need_bytes(n) / 2**30:.0f} GiB "
                                  f"({available_bytes() / 2**30:.0f} GiB available)"}
    cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--one", kind, impl, str(n), "--dim", str(args.dim),
           "--block", str(args.block), "--device", args.device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**base, "status": f"timed out after {args.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {**base, "status": why, "error": (proc.stderr.strip().splitlines() or [""])[-1][:300]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    """CLI entry: rows per (size, loss, implementation), table printed last, JSON as rows finish."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.loss_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=4096, help="tiled loss block (loss.block_size)")
    p.add_argument("--losses", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"])
    p.add_argument("--impls", nargs="+", default=["plain", "tiled"], choices=["plain", "tiled"])
    p.add_argument("--device", default="cuda" if gpu else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per row")
    p.add_argument("--one", nargs=3, metavar=("LOSS", "IMPL", "N"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "loss_memory.json"))
    a = p.parse_args(argv)
    if a.one:
        torch.set_grad_enabled(True)
        print(json.dumps(measure(a.one[0], a.one[1], int(a.one[2]), a.dim, a.block, torch.device(a.device))))
        return 0
    report = Report(a.out, "loss_memory", device=a.device, dim=a.dim, block=a.block, target_gib=TARGET_GIB,
                    memory="cuda max_memory_allocated" if a.device == "cuda" else "peak RSS (VmHWM) above the inputs",
                    threads=int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    for n in a.sizes:
        for kind in a.losses:
            rows = {impl: measure_in_child(kind, impl, n, a) for impl in a.impls}
            for row in rows.values():
                if "plain" in rows and row["impl"] == "tiled" and rows["plain"].get("status") == "ok" \
                        and row.get("status") == "ok":
                    row["time_vs_plain"] = row["seconds"] / rows["plain"]["seconds"]
                report.add(row)
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
