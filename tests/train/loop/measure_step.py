"""One real optimizer step of a config on CPU; prints its peak RSS above the start (JSON).

Run in a fresh process by ``test_plan.py`` with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``): with glibc's default dynamic threshold, freed blocks stay in the
heap and RSS overstates live memory by up to ~50 %, which is not what a plan predicts.
A warm-up step of another model at a tiny batch first: kernels, thread pools, allocator.

    python tests/train/loop/measure_step.py OVERRIDE ...
"""

from __future__ import annotations

import gc
import json
import sys

from benchmarks.procstats import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from train.core.collectives import Comm
from train.core.config import load_config
from train.core.distenv import DistEnv
from train.data.batch import Batch
from train.engines import EngineParts, build_engine
from train.model import build_model
from train.optim import build_optimizer, build_scheduler


def engine_and_batch(overrides: list[str]) -> tuple:
    cfg = load_config(None, overrides)
    bundle = build_model(cfg.model)
    opt = build_optimizer(bundle.model, cfg.optim)
    parts = EngineParts.from_config(cfg, bundle.model, opt, build_scheduler(opt, cfg.optim, 10), DistEnv(), "cpu",
                                    comm=Comm(DistEnv(), "cpu"))
    size = bundle.image_size if isinstance(bundle.image_size, int) else bundle.image_size[0]
    batch = Batch.empty(cfg.data.batch_size, size, int(bundle.tokenizer(["x"]).shape[1]))
    batch.images.random_(0, 256)
    batch.texts.random_(0, 100)
    return build_engine("ddp", parts), batch


def main(overrides: list[str]) -> None:
    engine, batch = engine_and_batch([*overrides, "data.batch_size=8", "train.accum_steps=1"])
    engine.step(batch)
    del engine, batch
    gc.collect()
    before = current_rss_bytes()
    reset_peak_rss()
    engine, batch = engine_and_batch(overrides)
    engine.step(batch)
    print(json.dumps({"peak_above_start": peak_rss_bytes() - before}))


if __name__ == "__main__":
    main(sys.argv[1:])
