"""Decoded + augmented + tokenized samples/s per CPU worker: our loader vs open_clip's.

``python -m benchmarks.data_throughput [--source rsicd|synthetic] [--workers 1 2] ...``

Each (pipeline, workers) configuration runs ``--repeats`` times, interleaved (ours,
theirs, ours, theirs, ...) so both see the same background load, each in a fresh
process (:mod:`benchmarks.pipeline_probe`; open_clip's in its side environment). We
report medians of wall-clock samples/s and of samples per CPU-second of the whole
process tree (main + workers), which is what "per CPU worker" means on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_data import SHARED_RSICD, rsicd_shards, synthetic_shards
from benchmarks.openclip_ref import ROOT, ref_env
from benchmarks.report import Report

TARGET_RATIO = 2.0


def with_root(pythonpath: str | None) -> str:
    """PYTHONPATH with the repository first, keeping what was there (e.g. the folder the GPU
    check installs its carried wheels into: dropping it loses open_clip and webdataset)."""
    return os.pathsep.join([str(ROOT), *([pythonpath] if pythonpath else [])])


def run_probe(pipeline: str, shards: Path, workers: int, batch_size: int, image_size: int, warmup: int,
              batches: int, model: str, timeout: float = 900) -> dict:
    """One measurement in a fresh process; returns the probe's JSON result.

    Raises:
        RuntimeError: the probe failed (its output tail is in the message).
    """
    env = ref_env() if pipeline == "openclip" else dict(os.environ, PYTHONPATH=with_root(os.environ.get("PYTHONPATH")))
    env["OMP_NUM_THREADS"] = "1"  # one thread per process: the worker count is the CPU budget
    cmd = [sys.executable, "-m", "benchmarks.pipeline_probe", "--pipeline", pipeline, "--shards", str(shards),
           "--workers", str(workers), "--batch-size", str(batch_size), "--image-size", str(image_size),
           "--warmup", str(warmup), "--batches", str(batches), "--model", model]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{pipeline} probe failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1])


def summarize(runs: list[dict]) -> dict:
    """Median rates of repeated runs of one configuration."""
    workers = runs[0]["workers"]
    wall = statistics.median(r["samples"] / r["wall_s"] for r in runs)
    per_cpu = statistics.median(r["samples"] / r["cpu_s"] for r in runs)
    return {
        "pipeline": runs[0]["pipeline"], "workers": workers, "batch": runs[0]["batch_size"],
        "samples_per_s": wall, "samples_per_s_per_worker": wall / workers,
        "samples_per_cpu_s": per_cpu, "cpu_ms_per_sample": 1e3 / per_cpu,
        "runs": len(runs), "wall_rates": [round(r["samples"] / r["wall_s"], 1) for r in runs],
    }


def compare(rows: list[dict]) -> list[dict]:
    """Ratio rows (ours / openclip) for each worker count measured for both."""
    out = []
    for w in sorted({r["workers"] for r in rows}):
        by = {r["pipeline"]: r for r in rows if r["workers"] == w}
        if {"ours", "openclip"} <= set(by):
            o, t = by["ours"], by["openclip"]
            ratio_cpu = o["samples_per_cpu_s"] / t["samples_per_cpu_s"]
            out.append({"pipeline": "ratio ours/openclip", "workers": w, "batch": o["batch"],
                        "samples_per_s": o["samples_per_s"] / t["samples_per_s"],
                        "samples_per_s_per_worker": o["samples_per_s_per_worker"] / t["samples_per_s_per_worker"],
                        "samples_per_cpu_s": ratio_cpu, "cpu_ms_per_sample": None, "runs": None,
                        "wall_rates": f"target >= {TARGET_RATIO}x: {'met' if ratio_cpu >= TARGET_RATIO else 'NOT met'}"})
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry: build/reuse shards, measure, print the table, write JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__)
    p.add_argument("--source", choices=["auto", "rsicd", "synthetic"], default="auto",
                   help="auto: RSICD 224 px JPEGs from ../shared/data if present, else synthetic")
    p.add_argument("--shards", help="use this shards output folder instead of building one")
    p.add_argument("--count", type=int, default=2000, help="synthetic: scenes (rsicd: 500 x --repeat)")
    p.add_argument("--repeat", type=int, default=4, help="rsicd: copies of each image")
    p.add_argument("--image-size", type=int, default=224, help="output size (synthetic source size too)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pipelines", nargs="+", choices=["ours", "openclip"], default=["ours", "openclip"])
    p.add_argument("--warmup", type=int, default=3, help="batches skipped before timing")
    p.add_argument("--batches", type=int, default=20, help="batches timed")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration (median reported)")
    p.add_argument("--model", default="ViT-B-32", help="tokenizer of this open_clip model")
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "data_throughput.json"))
    a = p.parse_args(argv)

    if a.shards:
        shards, source = Path(a.shards), "given"
    elif a.source == "rsicd" or (a.source == "auto" and (SHARED_RSICD / "dataset_rsicd.json").is_file()):
        shards, source = rsicd_shards(a.repeat), "rsicd"
    else:
        shards, source = synthetic_shards(a.count, a.image_size), "synthetic"
    raw: dict[tuple[str, int], list[dict]] = {}
    # The JSON holds every probe as it finishes (meta.raw) and the medians once all are in.
    report = Report(a.out, "data_throughput", shards=str(shards), source=source, image_size=a.image_size,
                    batch_size=a.batch_size, warmup=a.warmup, batches=a.batches, raw=[])
    for _ in range(a.repeats):
        for w in a.workers:
            for pipeline in a.pipelines:
                try:
                    r = run_probe(pipeline, shards, w, a.batch_size, a.image_size, a.warmup, a.batches, a.model)
                except RuntimeError as e:  # one failing pipeline keeps the other's results
                    report.meta["raw"].append({"pipeline": pipeline, "workers": w, "failed": str(e)[-500:]})
                    report.add({"pipeline": pipeline, "workers": w, "status": "failed"})
                    continue
                print(json.dumps(r), flush=True)
                raw.setdefault((pipeline, w), []).append(r)
                report.meta["raw"].append(r)
                report.save()
    rows = [summarize(runs) for runs in raw.values()]
    rows.sort(key=lambda r: (r["workers"], r["pipeline"] != "ours"))
    for row in rows + compare(rows):
        report.add(row, echo=False)
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
