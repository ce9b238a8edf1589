"""``python -m eval run|list``: evaluate models on benchmarks, or list the benchmarks."""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from eval import clip_benchmark
from eval.benchmark import BenchmarkSpec, available, load_benchmark
from eval.features import FeatureExtractor
from eval.report import legend, markdown_table, write_results
from eval.runner import run_benchmark
from train.api import ConfigError


class _ModelAction(argparse.Action):
    """--model appends a model; --name labels the --model given just before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = getattr(namespace, "models", None) or []
        if option_string == "--model":
            models.append({"spec": value, "name": None})
        elif not models or models[-1]["name"] is not None:
            parser.error("--name must follow the --model it labels")
        else:
            models[-1]["name"] = value
        namespace.models = models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="evaluate models on benchmarks; writes results.json + results.md")
    r.add_argument("--model", action=_ModelAction, dest="models", required=True,
                   help="ARCH, ARCH:TAG_OR_FILE, local-dir:DIR, hf:DIR, a run dir or checkpoint (repeatable)")
    r.add_argument("--name", action=_ModelAction, dest="models", help="table label for the preceding --model")
    r.add_argument("--benchmark", action="append", required=True, help="name in configs/benchmarks or a YAML file")
    r.add_argument("--out", required=True, type=Path,
                   help="output folder: results.json, results.md, per-model pictures, clip_benchmark/*.json")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--max-samples", type=int, default=None, help="evaluate at most N samples per benchmark")
    r.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="list shipped benchmarks, their evaluators and whether their data is here")
    return p


def _label_dir(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def _one_line(e: BaseException) -> str:
    """An error's message on one line (some wrap a library's multi-line text)."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def _check_args(args: argparse.Namespace) -> str:
    """The torch device to use; ConfigError for options that cannot work, before any model loads."""
    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise ConfigError("--batch-size and --max-samples must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return device


def _make_out_dir(out: Path) -> None:
    """Create ``--out`` now: a path that cannot be a folder should fail before the evaluation, not after."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the output folder ({e.strerror or e})") from None


def _load(spec: str, device: str) -> tuple[Any, str | None]:
    """(bundle, None), or (None, one-line reason) when ``spec`` names no loadable model."""
    from train.api import UserError, load_model  # heavy (open_clip) on first call: only once the arguments are valid

    try:
        return load_model(spec, device=device), None
    except (UserError, FileNotFoundError) as e:
        message = _one_line(e)
        return None, message if spec in message else f"--model {spec}: {message}"


def cmd_run(args: argparse.Namespace) -> int:
    device = _check_args(args)
    overrides = {"max_samples": args.max_samples} if args.max_samples else None
    specs: list[BenchmarkSpec] = [load_benchmark(b, overrides) for b in args.benchmark]
    _make_out_dir(args.out)

    start = time.perf_counter()
    rows, failed, unloadable = [], False, False
    for m in args.models:
        label = m["name"] or m["spec"]
        print(f"[eval] model {label} ({m['spec']}) on {device}", flush=True)
        bundle, problem = _load(m["spec"], device)
        if problem is not None:  # a user error: say so, keep going with the other models
            print(f"error: {problem}", file=sys.stderr, flush=True)
            unloadable = True
            rows.append({"model": label, "spec": m["spec"], "arch": None, "error": problem, "results": {
                s.name: {"status": "error", "message": f"model not loaded: {problem}"} for s in specs}})
            continue
        extractor = FeatureExtractor(bundle, device, batch_size=args.batch_size, progress=not args.no_progress)
        results = {}
        for spec in specs:
            res = run_benchmark(spec, extractor, args.out / _label_dir(label) / spec.name)
            results[spec.name] = asdict(res)
            if res.status == "ok":
                shown = ", ".join(f"{k}={v:.4g}" for k, v in res.metrics.items())
                print(f"[eval]   {spec.name}: {shown} ({res.seconds:.1f}s)", flush=True)
            else:
                failed |= res.status == "error"
                print(f"[eval]   {spec.name}: {res.status.upper()}: {res.message}", file=sys.stderr, flush=True)
        rows.append({"model": label, "spec": m["spec"], "arch": getattr(bundle, "arch", None),
                     "results": results})
        del bundle, extractor
    loaded = [r for r in rows if "error" not in r]
    if not loaded:
        return 2  # no model could be loaded: nothing to report
    # the legend travels with the table (results.md, recipe READMEs): column names alone do not
    # say that mean_recall counts another image's identical caption as a miss
    notes = legend(specs)
    table = markdown_table(rows, specs) + (f"\n\n{notes}" if notes else "")
    payload = {"models": rows, "benchmarks": [s.name for s in specs], "device": device,
               "seconds": round(time.perf_counter() - start, 2)}
    json_path, md_path = write_results(args.out, payload, table)
    cb_files = clip_benchmark.write_files(args.out / "clip_benchmark", loaded)
    print(table)
    print(f"[eval] wrote {json_path} and {md_path} in {payload['seconds']:.1f}s; "
          f"{len(cb_files)} CLIP_benchmark files in {args.out / 'clip_benchmark'}", flush=True)
    return 2 if unloadable else 1 if failed else 0


def cmd_list() -> int:
    for name in available():
        try:
            spec = load_benchmark(name)
        except ConfigError as e:
            print(f"{name}: INVALID: {e}")
            continue
        if spec.data.kind == "synthetic":
            where = "synthetic (always available)"
        else:
            path = spec.data.resolve(spec.data.path)
            where = f"{path} ({'present' if path.exists() else 'absent'})"
        print(f"{name}: {', '.join(spec.evaluators)} | data: {where}")
        if spec.sources:
            print(f"    sources: {spec.sources}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return cmd_run(args) if args.command == "run" else cmd_list()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
