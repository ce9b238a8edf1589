"""Real ``python -m train`` runs, as a user starts them, checked and measured (GPU check stages).

    python -m benchmarks.train_runs accum   --out runs/benchmarks/train_accum.json
    python -m benchmarks.train_runs resume  --out runs/benchmarks/train_resume.json
    python -m benchmarks.train_runs zero    --out runs/benchmarks/train_zero.json
    python -m benchmarks.train_runs two-procs --out runs/benchmarks/train_two_procs.json

Scenarios (ViT-B/32 bf16 on 224 px synthetic shards built on local disk by default; the CPU
smoke passes ``--smoke``: orbit-micro, 32 px, a few steps, same code paths):

- ``accum``: the DDP engine with ``train.accum_steps`` 1 and 4 at the same batch: the loss
  falls, peak memory and samples/s per run, and the two runs' weights agree to the stated
  tolerance of the precision (bf16: relative 5e-3, README "What exact means").
- ``resume``: a run SIGKILLed after its first checkpoint, resumed (``train.resume=auto``) to
  the end, against the same run uninterrupted: bitwise, or the relative difference.
- ``zero``: the DeepSpeed engine at ZeRO stage 1, 2 and 3, world 1: loss falls, peak memory.
- ``two-procs``: two ranks on one device (gloo over CUDA tensors: NCCL refuses two ranks
  per GPU) against one rank with the same global batch.

Each finished run is a row in the JSON at once (:class:`benchmarks.report.Report`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.openclip_ref import ROOT
from benchmarks.report import Report

PARAM_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-3}
"""Relative difference of the whole parameter vector allowed between two cuts of one batch
(README "What exact means in each precision"; the tests hold the same numbers)."""

STEP_LINE = re.compile(r"step (\d+)/(\d+) \| (.*)$")


def log_rows(text: str) -> list[dict[str, float]]:
    """The trainer's log lines (``step N/T | loss x | ...``) as dicts with ``step``."""
    rows = []
    for line in text.splitlines():
        m = STEP_LINE.search(line)
        if m:
            row: dict[str, float] = {"step": int(m.group(1))}
            for part in m.group(3).split(" | "):
                key, _, value = part.strip().partition(" ")
                try:
                    row[key] = float(value)
                except ValueError:
                    pass
            rows.append(row)
    return rows


class Scenario:
    """Sizes and the base command line of the runs (full GPU size, or the CPU smoke)."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.smoke, self.work, self.args = args.smoke, work, args
        self.steps = args.steps or (6 if self.smoke else 60)
        self.batch = args.batch or (16 if self.smoke else 256)
        self.precision = args.precision

    def shards(self) -> Path:
        """Synthetic shards on local disk (built once, reused by every run of the stage)."""
        from benchmarks.bench_data import synthetic_shards

        size, count = (32, 256) if self.smoke else (224, max(4096, self.batch * 8))
        return synthetic_shards(count, size, shard_size=64 if self.smoke else 256, workers=self.args.workers)

    def overrides(self, name: str, **extra: Any) -> list[str]:
        model = "orbit-micro" if self.smoke else self.args.model
        o = {
            "run.root": str(self.work), "run.name": name, "model.name": model,
            "data.source": "shards", "data.batch_size": self.batch, "data.workers": self.args.workers,
            "train.steps": self.steps, "train.precision": self.precision, "train.log_every": 1,
            "train.checkpoint_every": max(2, self.steps // 3), "train.progress": "false",
            "optim.warmup_steps": 2, "eval.at_end": "false",
        }
        o.update(extra)
        return [f"{k}={v}" for k, v in o.items()]

    def fresh(self, name: str) -> str:
        """``name``, with any earlier run of that name removed (runs auto-resume by default)."""
        shutil.rmtree(self.work / name, ignore_errors=True)
        return name

    def command(self, name: str, nproc: int = 1, **extra: Any) -> list[str]:
        shards = self.shards()
        base = [sys.executable, "-m", "train", "--config", str(self.config(shards))]
        if nproc > 1:
            base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                    "-m", "train", "--config", str(self.config(shards))]
        return base + self.overrides(name, **extra)

    def config(self, shards: Path) -> Path:
        path = self.work / "base.yaml"
        if not path.exists():
            self.work.mkdir(parents=True, exist_ok=True)
            path.write_text(f"data:\n  shards:\n    - {{path: {shards}, split: train}}\n")
        return path


def run_train(cmd: list[str], timeout: float, kill_after_checkpoint: Path | None = None) -> dict[str, Any]:
    """Run one training command; returns rc, wall time and the parsed log rows.

    With ``kill_after_checkpoint`` (a run directory) the run is SIGKILLed as soon as its first
    checkpoint is published and one more step was logged (a kill between checkpoints).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, killed = [], False
    assert proc.stdout is not None
    deadline = t0 + timeout
    for line in proc.stdout:
        lines.append(line)
        if time.perf_counter() > deadline:
            proc.kill()
            break
        if kill_after_checkpoint is not None and STEP_LINE.search(line):
            latest = kill_after_checkpoint / "checkpoints" / "latest"
            rows = log_rows("".join(lines))
            if latest.exists() and rows and rows[-1]["step"] > int(latest.read_text().strip().split("_")[-1]):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
    rc = proc.wait()
    text = "".join(lines)
    return {"rc": rc, "killed": killed, "wall_s": time.perf_counter() - t0, "log": log_rows(text),
            "tail": text.strip().splitlines()[-1:] or [""], "timed_out": time.perf_counter() > deadline}


def summarize(name: str, res: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One table row for a finished run."""
    log = res["log"]
    losses = [r["loss"] for r in log if "loss" in r]
    rates = sorted(r["samples_per_s"] for r in log[1:] if "samples_per_s" in r) or [float("nan")]
    ok = res["rc"] == 0 and len(losses) >= 2 and losses[-1] < losses[0]
    row = {"run": name, **extra, "status": "ok" if ok else ("timed out" if res["timed_out"] else f"rc {res['rc']}"),
           "steps": log[-1]["step"] if log else 0, "first_loss": losses[0] if losses else None,
           "last_loss": losses[-1] if losses else None, "loss_fell": bool(losses) and losses[-1] < losses[0],
           "samples_per_s": rates[len(rates) // 2], "peak_mem_gb": max((r.get("peak_mem_gb", 0) for r in log), default=None),
           "wall_s": res["wall_s"]}
    if not ok and res["rc"] != 0:
        row["error"] = res["tail"][-1][:300]
    return row


def weight_diff(a: Path, b: Path) -> dict[str, Any]:
    """Bitwise equality and relative difference ``|a - b| / |b|`` of two runs' final weights."""
    import torch

    sa, sb = (torch.load(p / "model.pt", weights_only=True, map_location="cpu") for p in (a, b))
    va = torch.cat([v.double().flatten() for k, v in sorted(sa.items())])
    vb = torch.cat([v.double().flatten() for k, v in sorted(sb.items())])
    return {"bitwise": all(torch.equal(sa[k], sb[k]) for k in sa),
            "rel_diff": float((va - vb).norm() / vb.norm().clamp_min(1e-30))}


def compare_row(what: str, a: Path, b: Path, precision: str) -> dict[str, Any]:
    """A row saying whether two runs' weights agree to the precision's stated tolerance."""
    if not ((a / "model.pt").is_file() and (b / "model.pt").is_file()):
        return {"run": what, "status": "missing model.pt (a run failed)"}
    d = weight_diff(a, b)
    tol = PARAM_TOLERANCE["bf16" if precision in ("bf16", "auto") else "fp32"]
    return {"run": what, **d, "tolerance": tol, "status": "ok" if d["bitwise"] or d["rel_diff"] <= tol else "DIFFERS"}


def scenario_accum(s: Scenario, report: Report, timeout: float) -> None:
    for k in (1, 4):
        name = s.fresh(f"accum{k}")
        report.add(summarize(name, run_train(s.command(name, **{"train.accum_steps": k}), timeout), accum=k))
    report.add(compare_row("accum 4 vs 1 (weights)", s.work / "accum4", s.work / "accum1", s.precision))


def scenario_resume(s: Scenario, report: Report, timeout: float) -> None:
    report.add(summarize("uninterrupted", run_train(s.command(s.fresh("uninterrupted")), timeout)))
    killed = run_train(s.command(s.fresh("resumed")), timeout, kill_after_checkpoint=s.work / "resumed")
    report.add({"run": "killed", "status": "SIGKILLed" if killed["killed"] else f"not killed (rc {killed['rc']})",
                "steps": killed["log"][-1]["step"] if killed["log"] else 0, "wall_s": killed["wall_s"]})
    res = run_train(s.command("resumed", **{"train.resume": "auto"}), timeout)
    report.add(summarize("resumed", res))
    report.add(compare_row("resumed vs uninterrupted (weights)", s.work / "resumed", s.work / "uninterrupted",
                           s.precision))


def scenario_zero(s: Scenario, report: Report, timeout: float) -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # not installed (or broken): a reported skip, not a silent pass
        report.add({"run": "zero", "status": f"skipped: deepspeed not importable ({type(e).__name__}: {e})"[:300]})
        return
    for stage in (1, 2, 3):
        name = s.fresh(f"zero{stage}")
        cmd = s.command(name, **{"train.engine": "deepspeed", "deepspeed.zero_stage": stage})
        report.add(summarize(name, run_train(cmd, timeout), zero_stage=stage))


def scenario_two_procs(s: Scenario, report: Report, timeout: float) -> None:
    # The synthetic source gives step t the same global batch at any world size (shards are
    # split per rank, which changes the order), so the two runs train on the same samples.
    half, same = s.batch // 2, {"data.source": "synthetic", "data.synthetic_image_size": 32 if s.smoke else 224,
                                "data.synthetic_samples": s.batch * s.steps}
    one = s.command(s.fresh("one"), **{"data.batch_size": s.batch, **same})
    report.add(summarize("one process", run_train(one, timeout)))
    two = s.command(s.fresh("two"), nproc=2, **{"data.batch_size": half, "train.dist_backend": "gloo", **same})
    report.add(summarize("two processes (gloo)", run_train(two, timeout), world=2))
    report.add(compare_row("two vs one process (weights)", s.work / "two", s.work / "one", s.precision))


SCENARIOS = {"accum": scenario_accum, "resume": scenario_resume, "zero": scenario_zero, "two-procs": scenario_two_procs}


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one scenario, rows written as each run finishes, the table printed last."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (the same code paths)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--steps", type=int, help="steps per run (default 60; smoke 6)")
    p.add_argument("--batch", type=int, help="global batch (default 256; smoke 16)")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)))
    p.add_argument("--timeout", type=float, default=240, help="seconds allowed per run")
    p.add_argument("--work", help="folder for the runs (default: next to --out)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    work = Path(a.work) if a.work else out.parent / f"{out.stem}_runs"
    s = Scenario(a, work.resolve())
    report = Report(out, f"train_runs {a.scenario}", scenario=a.scenario, smoke=a.smoke, steps=s.steps,
                    batch=s.batch, precision=a.precision, model="orbit-micro" if a.smoke else a.model)
    try:
        SCENARIOS[a.scenario](s, report, a.timeout)
    except BaseException as e:
        report.fail(e)
        raise
    report.finish()
    bad = [r for r in report.rows if not (r.get("status") == "ok" or str(r.get("status", "")).startswith(("skipped", "SIGKILLed")))]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
