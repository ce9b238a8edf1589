"""One data-pipeline measurement in a fresh process (run by :mod:`benchmarks.data_throughput`).

``python -m benchmarks.pipeline_probe --pipeline ours|openclip --shards DIR ...`` builds
either our loader (``train.data.build_train_loader``) or open_clip's
``open_clip_train.data.get_wds_dataset`` on the same shards, with the same batch size,
workers, output size and tokenizer, skips ``--warmup`` batches (worker start, shuffle
buffer fill) and times the next ``--batches``. The last stdout line is a JSON result.
The ``openclip`` pipeline must run in :func:`benchmarks.openclip_ref.ref_env`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace
from typing import Iterable, Iterator

import torch

from benchmarks.procstats import tree_cpu_seconds

import train.core.compat  # noqa: E402  (before open_clip imports torchvision)

train.core.compat.ensure_torchvision()

import open_clip  # noqa: E402

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def ours_loader(shards: str, batch_size: int, workers: int, image_size: int, model: str) -> Iterable:
    """Our training loader, default augmentation (random resized crop, flips, rot90)."""
    from train.core.config import Config, ShardSourceConfig
    from train.data import build_train_loader
    from train.core.distenv import DistEnv

    cfg = Config()
    cfg.data.shards = [ShardSourceConfig(path=shards)]
    cfg.data.batch_size, cfg.data.workers = batch_size, workers
    return build_train_loader(cfg.data, cfg.train.seed, DistEnv(), open_clip.get_tokenizer(model), image_size, MEAN, STD)


def openclip_loader(shards: str, batch_size: int, workers: int, image_size: int, model: str) -> Iterable:
    """open_clip_train's webdataset loader with its default training transform."""
    from open_clip_train.data import get_wds_dataset

    from benchmarks.bench_data import shard_urls

    pattern, count = shard_urls(shards)
    args = SimpleNamespace(
        train_data=pattern, train_num_samples=count, dataset_resampled=False, train_data_upsampling_factors=None,
        seed=0, batch_size=batch_size, workers=workers, world_size=1,
    )
    preprocess = open_clip.image_transform(image_size, is_train=True, mean=MEAN, std=STD)
    return get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer(model)).dataloader


def _endless(loader: Iterable) -> Iterator:
    while True:  # open_clip's loader ends with its epoch; ours never does
        yield from loader


def _size(batch: object) -> tuple[int, tuple[int, ...]]:
    images = batch.images if hasattr(batch, "images") else batch[0]
    return int(images.shape[0]), tuple(images.shape[1:])


def measure(loader: Iterable, warmup: int, batches: int) -> dict:
    """Skip ``warmup`` batches, then time ``batches``: samples, wall and CPU seconds (all
    processes, and the main process alone)."""
    it = _endless(loader)
    for _ in range(warmup):
        next(it)
    t0, c0, m0 = time.perf_counter(), tree_cpu_seconds(), time.process_time()
    samples, shape = 0, ()
    for _ in range(batches):
        n, shape = _size(next(it))
        samples += n
    wall, cpu, main_cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0, time.process_time() - m0
    return {"samples": samples, "wall_s": wall, "cpu_s": cpu, "main_cpu_s": main_cpu, "image_shape": list(shape)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry; prints the result JSON as the last line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_probe")
    p.add_argument("--pipeline", choices=["ours", "openclip"], required=True)
    p.add_argument("--shards", required=True, help="a shards output folder (train split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--model", default="ViT-B-32", help="whose tokenizer (open_clip name)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    build = ours_loader if a.pipeline == "ours" else openclip_loader
    loader = build(a.shards, a.batch_size, a.workers, a.image_size, a.model)
    result = {"pipeline": a.pipeline, "workers": a.workers, "batch_size": a.batch_size,
              **measure(loader, a.warmup, a.batches)}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
