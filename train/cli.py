"""``python -m train``: train from a config, or export a model (``python -m train export``).

    python -m train --config configs/demo.yaml optim.lr=5e-4 train.steps=1000
    python -m train --config demo                      # a shipped config by name
    python -m train export runs/demo --format hf --out runs/demo-hf   # see train.export
    python -m train plan --config demo data.batch_size=65536 --memory 80GiB  # memory of one step

User errors (a config typo, missing shards, an unreadable model file, a checkpoint from
another world size, ...) print one line and exit with status 2; a run stopped by non-finite
steps or a failure on another rank exits with 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import configs
from train.core.collectives import PeerError
from train.core.config import load_config
from train.core.distenv import DistEnv, dist_env_from
from train.core.errors import UserError, say
from train.loop.metrics import NonFiniteLossError

log = logging.getLogger("train")
DEFAULT_CONFIG = "demo"


def _setup_logging(env: DistEnv) -> None:
    # Our progress lines on rank 0 only; libraries (open_clip logs to the root logger) at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(message)s", stream=sys.stderr
    )
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train", description="Train a CLIP model (configs/*.yaml).",
        epilog="example: python -m train --config configs/demo.yaml optim.lr=5e-4 train.steps=1000\n"
               "export:  python -m train export RUN_OR_CHECKPOINT --format hf|open_clip|pt --out DIR "
               "(see python -m train export --help)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="YAML file, or a shipped config by name (demo, recipes/eurosat_scratch_cpu); default: demo")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 train.steps=100")
    return p


def train_main(argv: list[str]) -> int:
    """Train; returns the exit code."""
    from train.trainer import run

    args = _train_parser().parse_args(argv)
    env = dist_env_from(os.environ)
    _setup_logging(env)
    try:
        cfg = load_config(configs.run_config(args.config), args.overrides)
        result = run(cfg, env)
    except UserError as e:
        say(f"error: {e}")  # every rank says it: one write each, so their lines stay whole
        return 2
    except (NonFiniteLossError, PeerError) as e:
        log.error("%s", e)
        return 1
    if env.is_main:  # one machine-readable result line per job
        print(json.dumps({"status": result.status, "step": result.step, "run_dir": str(result.run_dir)}), flush=True)
    return 0


def plan_main(argv: list[str]) -> int:
    """``python -m train plan``: the predicted memory of one step (see :mod:`train.loop.plan`)."""
    from train.loop.plan import largest_batch, parse_bytes, plan_step

    p = argparse.ArgumentParser(prog="python -m train plan",
                                description="Predict one optimizer step's peak memory (device and host) for a config, "
                                            "by counting the real step under fake tensors; nothing is allocated.")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML file, or a shipped config by name")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=65536 train.accum_steps=128")
    p.add_argument("--world", type=int, default=1, help="ranks of the job (the plan is per rank)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="count on this device (default: the run's)")
    p.add_argument("--memory", help="per-rank memory, e.g. 80GiB: also find the largest batch that fits "
                                    "(same micro-batch, more accumulation)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        if args.world < 1:
            raise UserError(f"--world must be >= 1, got {args.world}")
        cfg = load_config(configs.run_config(args.config), args.overrides)
        plan = plan_step(cfg, args.world, args.device)
        best = largest_batch(cfg, parse_bytes(args.memory), args.world, args.device) if args.memory else None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {"plan": plan.to_dict()}
        if args.memory:
            out["largest"] = best.to_dict() if best else None
        print(json.dumps(out))
        return 0
    print("\n".join(plan.lines()))
    if args.memory:
        if best is None:
            print(f"largest batch within {args.memory}: none (one micro-batch of "
                  f"{cfg.data.batch_size // cfg.train.accum_steps} does not fit)")
        else:
            print(f"largest batch within {args.memory}: {best.effective_batch:,} "
                  f"(accum {best.accum_steps} x {best.batch_per_rank // best.accum_steps:,} per rank)")
            print("\n".join("  " + line for line in best.lines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m train`` (and ``orbitclip-train``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        from train.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    return train_main(argv)
