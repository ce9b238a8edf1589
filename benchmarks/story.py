"""The users' fine-tuning story, end to end with our own checkpoints, as one command.

    python -m benchmarks.story [--skip-pretrain]

1. pre-train from scratch on RSICD + UCM-captions captions (the ``rsicd_scratch_cpu`` recipe;
   reused when ``runs/recipes/rsicd_scratch_cpu`` already holds a finished run);
2. fine-tune that checkpoint on EuroSAT class-template captions (``story_finetune_cpu``);
3. one comparison table from the eval harness: random init, pre-trained (zero-shot transfer
   to EuroSAT) and fine-tuned, on EuroSAT zero-shot/linear probe and UCM-captions retrieval
   (what fine-tuning costs on the pre-training domain). Written to ``runs/recipes/story/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.recipes import (
    EUROSAT, ROOT, Recipe, _env, _load_recorded, _run, _write_recorded, ensure_shards, eval_command, run_recipe,
    train_command, train_samples,
)
from benchmarks.report import machine_info

PRETRAIN = "rsicd_scratch_cpu"
FINETUNE = Recipe("configs/recipes/story_finetune_cpu.yaml", [EUROSAT], ["eurosat"], [("eurosat", "acc1")], None, 100_000)
BENCHMARKS = ["eurosat", "ucm_captions_val"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.story", description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-pretrain", action="store_true", help="reuse runs/recipes/rsicd_scratch_cpu as it is")
    p.add_argument("--record", action="store_true", help="store the table in configs/recipes/results.json")
    args = p.parse_args(argv)
    pre = ROOT / "runs" / "recipes" / PRETRAIN
    if not (args.skip_pretrain or (pre / "model.pt").exists()):
        run_recipe(PRETRAIN, [])
    env = _env(FINETUNE)
    ensure_shards(FINETUNE, env)
    finetune_s = _run(train_command(FINETUNE, "story_finetune_cpu", []), env)
    out = Path("runs/recipes/story/eval")
    models = [("orbit-slim-p8", "random init (orbit-slim-p8)"),
              (f"runs/recipes/{PRETRAIN}", "pre-trained on RSICD+UCM (zero-shot)"),
              ("runs/recipes/story_finetune_cpu", "fine-tuned on EuroSAT captions")]
    eval_s = _run(eval_command(models, BENCHMARKS, out), env)
    print(f"[story] table: {out / 'results.md'}")
    if args.record:
        rows = {r["model"]: r["results"] for r in json.loads((ROOT / out / "results.json").read_text())["models"]}
        recorded = _load_recorded()
        recorded["story"] = {
            "recipe": "story", "command": "python -m benchmarks.story" + (" --skip-pretrain" if args.skip_pretrain else ""),
            "train_wall_s": round(finetune_s, 1), "eval_wall_s": round(eval_s, 1),
            "train_samples": train_samples(FINETUNE, []), "budget_samples": FINETUNE.budget_samples,
            "metrics": {f"{label}/eurosat/acc1": res["eurosat"]["metrics"]["acc1"] for label, res in rows.items()},
            "target": None, "table": (ROOT / out / "results.md").read_text(), "machine": machine_info(),
            "note": f"pre-training: the {PRETRAIN} run above; training time = the fine-tuning only; "
                    f"fine-tune command: {shlex.join(train_command(FINETUNE, 'story_finetune_cpu', [])[1:])}",
        }
        _write_recorded(recorded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
