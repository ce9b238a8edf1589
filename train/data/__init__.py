"""Training data: shard streaming or synthetic scenes -> augmented, tokenized :class:`Batch` es.

Two loaders implement :class:`TrainLoader`: webdataset shards (:mod:`train.data.shards`) and a
deterministic in-memory synthetic set (:mod:`train.data.synthetic_loader`). Both are infinite
(epochs roll over by themselves) and resume exactly from ``state_dict()``.
"""

from __future__ import annotations

from typing import Sequence

from train.core.config import DataConfig
from train.core.distenv import DistEnv
from train.data.augment import build_train_transform
from train.data.batch import Batch, CachedTokenizer, Tokenizer, TrainLoader


def build_train_loader(
    data: DataConfig,
    seed: int,
    env: DistEnv,
    tokenizer: Tokenizer,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> TrainLoader:
    """The training loader for this rank, as ``data`` describes.

    Args:
        data: the ``data`` config section.
        seed: the run's seed (``train.seed``); every sample's randomness derives from it.
        env: this process's rank and world size.
        tokenizer: callable ``list[str] -> LongTensor[N, ctx]``, run in the workers.
        image_size: model input size.
        mean: normalization mean of the model.
        std: normalization std of the model.
    """
    transform = build_train_transform(data.augment, image_size, mean, std)
    tokenizer = CachedTokenizer(tokenizer)
    if data.source == "synthetic":
        from train.data.synthetic_loader import SyntheticTrainLoader

        return SyntheticTrainLoader(data, seed, env, tokenizer, transform)
    from train.data.shards.loader import ShardTrainLoader

    return ShardTrainLoader(data, seed, env, tokenizer, transform)


def batches_held(data: DataConfig, cuda: bool) -> int:
    """How many whole batches the loader holds at once, at most: the synthetic source and
    ``workers=0`` build one at a time; worker processes each prefetch ``prefetch_factor`` and
    the trainer holds the one in use, plus its pinned copy on CUDA."""
    if data.source == "synthetic" or data.workers == 0:
        return 1
    return data.workers * data.prefetch_factor + 1 + int(cuda and data.pin_memory)


def working_bytes(data: DataConfig, image_size: int) -> tuple[int, str | None]:
    """Host memory the loader keeps besides its batches, and what it leaves uncounted (or None):
    the synthetic source caches its scenes; shard workers hold raw samples in their shuffle
    buffers, whose size depends on the files."""
    if data.source == "synthetic":
        from train.data.synthetic_loader import cache_bytes

        return cache_bytes(data, image_size), None
    return 0, (f"not counted: each loader worker's shuffle buffer of {data.shuffle_buffer} raw (encoded) samples "
               "and its decoded images in flight")


__all__ = ["Batch", "Tokenizer", "TrainLoader", "batches_held", "build_train_loader", "working_bytes"]
