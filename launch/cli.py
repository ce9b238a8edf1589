"""Command line: ``python -m launch slurm|local|status ...``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import yaml

from launch import local, slurm
from launch.status import format_status, run_status
from launch.sweep import RunSet, resolve_runs
from launch.task import input_error_line
from train.api import ConfigError, to_dict

EPILOG = "Config overrides are section.key=value words anywhere after the subcommand (e.g. optim.lr=1e-4)."


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML (as for python -m train)")
    p.add_argument(
        "--sweep", action="extend", nargs="+", default=[], metavar="KEY=V1,V2",
        help="sweep axis; repeat or list several; the Cartesian product is launched, "
        "each member in run dir <run.name>-<key=value...>",
    )
    p.add_argument("--signal-delay-s", type=int, default=None,
                   help="seconds before the time limit at which USR1 asks for a checkpoint")
    p.add_argument("--max-timeouts", type=int, default=None, help="requeues allowed after hitting the time limit")
    p.add_argument("--target", default="train.trainer:run", help=argparse.SUPPRESS)  # tests use stand-ins


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (overrides are collected separately)."""
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("slurm", help="submit to SLURM through submitit", epilog=EPILOG)
    _add_run_args(s)
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, required=True, help="also the tasks per node (one per GPU)")
    s.add_argument("--partition", required=True)
    s.add_argument("--time", required=True, help="wall time, HH:MM:SS or D-HH:MM:SS")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--constraint")
    s.add_argument("--exclude", help="nodes to avoid")
    s.add_argument("--mem", help="memory per node, SLURM syntax (64G)")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--setup", action="append", default=[], help="shell line run before srun (repeatable)")
    s.add_argument("--max-peer-requeues", type=int, default=None,
                   help="requeues allowed after a rank or node is lost (resume from the last checkpoint; default 3)")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script and configs; submit nothing")

    lo = sub.add_parser("local", help="run on this machine: NPROC processes with torchrun's variables", epilog=EPILOG)
    _add_run_args(lo)
    lo.add_argument("--nproc", type=int, default=1, help="processes (one per GPU when there are GPUs)")
    lo.add_argument("--time", default=None, help="optional wall time; USR1 before it triggers checkpoint+requeue")
    lo.add_argument("--no-wait", action="store_true", help="return after starting instead of waiting")

    st = sub.add_parser("status", help="jobs, states, progress and latest checkpoint of a run")
    st.add_argument("run_dir")
    return parser


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse options; bare ``key=value`` words are config overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    unknown = [w for w in extra if w.startswith("-") or "=" not in w]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "status" and extra:
        parser.error(f"status takes no overrides: {' '.join(extra)}")
    return args, extra


def _print_configs(runs: RunSet) -> None:
    for cfg in runs.configs:
        print(f"# ---- resolved config: {cfg.run.dir}")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def _kw(args: argparse.Namespace, **names: str) -> dict:
    # Only options the user gave, so each module's defaults stay the single source.
    return {dst: getattr(args, src) for dst, src in names.items() if getattr(args, src) is not None}


def cmd_slurm(args: argparse.Namespace, overrides: list[str]) -> int:
    runs = resolve_runs(args.config, overrides, args.sweep)
    req = slurm.SlurmRequest(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, mem=args.mem,
        cpus_per_task=args.cpus_per_task, exclude=args.exclude, setup=args.setup,
        **_kw(args, signal_delay_s="signal_delay_s", max_timeouts="max_timeouts", max_peer_requeues="max_peer_requeues"),
    )
    if args.dry_run:
        script = slurm.sbatch_text(runs, req)  # before printing anything: it validates the request
        print("# ---- sbatch script (submitit would submit this; --dry-run submitted nothing)")
        print(script)
        _print_configs(runs)
        return 0
    jobs = slurm.submit(runs, req, target=args.target)
    for cfg, job in zip(runs.configs, jobs):
        print(f"submitted job {job.job_id}: run {cfg.run.dir} (logs {job.paths.folder})")
    return 0


def cmd_local(args: argparse.Namespace, overrides: list[str]) -> int:
    runs = resolve_runs(args.config, overrides, args.sweep)
    code = 0
    for cfg in runs.configs:  # one at a time: each run uses all NPROC slots
        job = local.submit(
            cfg, args.nproc, target=args.target, time=args.time,
            **_kw(args, signal_delay_s="signal_delay_s", max_timeouts="max_timeouts"),
        )
        print(f"started local job {job.job_id}: run {cfg.run.dir} (logs {job.paths.folder})", flush=True)
        if args.no_wait:
            continue
        try:
            result = job.results()[0]  # rank 0's RunResult
        except KeyboardInterrupt:
            job.cancel()
            raise
        except Exception as e:  # submitit wraps the task's traceback; show it and go on
            problem = input_error_line(str(e))
            if problem is None:  # a bug somewhere: the whole traceback helps
                print(f"run {cfg.run.dir} failed:\n{e}", file=sys.stderr)
                code = max(code, 1)
            else:  # bad input the trainer named: one line (the traceback is in the log)
                print(f"error: run {cfg.run.dir}: {problem} (log: {job.paths.stderr})", file=sys.stderr)
                code = 2
            continue
        print(f"run {cfg.run.dir}: {getattr(result, 'status', result)} at step {getattr(result, 'step', '?')}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m launch``; returns the exit code."""
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "slurm":
            return cmd_slurm(args, overrides)
        if args.command == "local":
            return cmd_local(args, overrides)
        print(format_status(run_status(args.run_dir)))
        return 0
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
