"""``python -m shards build|inspect`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from shards import api
from shards.classnames import TABLES
from shards.sources import SOURCES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build WebDataset shards from a dataset")
    b.add_argument("--source", required=True, choices=sorted(SOURCES))
    b.add_argument("--input", help="class folder, caption JSON or CSV (not for synthetic)")
    b.add_argument("--output", required=True)
    b.add_argument("--template", dest="templates", action="append",
                   help='caption template with {} for the class name (repeatable; default "a satellite photo of {}.")')
    b.add_argument("--class-map", help="JSON/CSV folder -> readable class name")
    b.add_argument("--dataset", default="auto", choices=["auto", "none", *sorted(TABLES)],
                   help="built-in class-name table (auto: detect from folder names)")
    b.add_argument("--split-file", help="CSV split,class,filename")
    b.add_argument("--val-fraction", type=float)
    b.add_argument("--test-fraction", type=float)
    b.add_argument("--images", help="image root for karpathy/csv sources")
    b.add_argument("--image-column", default="image")
    b.add_argument("--caption-column", default="caption")
    b.add_argument("--separator", default=",")
    b.add_argument("--split-column")
    b.add_argument("--label-column")
    b.add_argument("--count", type=int, default=1000, help="synthetic: number of scenes")
    b.add_argument("--seed", type=int, default=0, help="synthetic: dataset seed")
    b.add_argument("--image-size", type=int, default=64, help="synthetic: image side")
    b.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    b.add_argument("--shard-bytes", type=int, default=512 * 1024 * 1024, help="max bytes per shard")
    b.add_argument("--resize", type=int, help="resize so the shorter side is this (keeps aspect)")
    b.add_argument("--jpeg-quality", type=int, default=95)
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep pixel-identical duplicates")
    b.add_argument("--drop-leaks", action="store_true", help="drop images already in an earlier split")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("inspect", help="verify shards and show counts and captions")
    i.add_argument("output")
    i.add_argument("--grid", help="write a contact sheet PNG here")
    i.add_argument("--examples", type=int, default=3)
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _summary(manifest: dict[str, Any]) -> str:
    lines = [f"source {manifest['source']}: {manifest['input'] or '(generated)'}"]
    for split, st in manifest["splits"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in st["skipped_reasons"].items()) or "-"
        leaks = f", leaks {st['leaks']}" if st["leaks"] else ""
        lines.append(f"  {split:>6}: {st['written']} written in {st['shards']} shards, "
                     f"{st['skipped']} skipped ({reasons}){leaks}")
    un = manifest["unassigned"]
    if un["count"]:
        lines.append(f"  not assigned to a split: {un['count']} ({un['reasons']})")
    return "\n".join(lines)


def _nothing_written(manifest: dict[str, Any]) -> str | None:
    """Why a build wrote no sample at all (its inputs, all skipped), or None if it wrote some."""
    splits = manifest["splits"].values()
    if any(st["written"] for st in splits):
        return None
    reasons: Counter[str] = Counter(manifest["unassigned"]["reasons"])
    for st in splits:
        reasons.update(st["skipped_reasons"])
    inputs = sum(st["inputs"] for st in splits) + manifest["unassigned"]["count"]
    if not inputs:
        return f"{manifest['input'] or 'the source'} holds no inputs"
    return f"every input was skipped ({inputs} in all: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})"


def _print_report(report: dict[str, Any]) -> None:
    print(f"source: {report['source']}")
    for split, st in report["splits"].items():
        print(f"{split}: {st['samples']} samples in {st['shards']} shards")
        for name, n in st["classes"].items():
            print(f"    {n:7d}  {name}")
        for cap in st["examples"]:
            print(f"    e.g. {cap}")
    for err in report["errors"]:
        print(f"ERROR {err}")
    print("OK: every shard verified" if report["ok"] else f"FAILED: {len(report['errors'])} problem(s)")
    if report.get("grid"):
        print(f"contact sheet: {report['grid']}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 verification failed, 2 bad usage/input)."""
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command == "build":
            source, input_path, output = args.pop("source"), args.pop("input"), args.pop("output")
            args["progress"] = not args.pop("quiet")
            if args["templates"] is None:
                args.pop("templates")
            manifest = api.build(source, input_path, output, **args)
            print(_summary(manifest))
            problem = _nothing_written(manifest)
            if problem:
                print(f"error: no samples written to {output}: {problem}", file=sys.stderr)
                return 2
            return 0
        report = api.inspect(args["output"], grid=args["grid"], examples=args["examples"])
        print(json.dumps(report, indent=2)) if args["json"] else _print_report(report)
        return 0 if report["ok"] else 1
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
