"""The webdataset shard loader (main-process side): epochs, position, counters.

Position = (epoch, batches consumed in that epoch) plus, per logical worker, the raw
samples it consumed (``cursors``), which differ from ``batches x batch_size`` only
when samples were skipped. Epoch ``e`` has ``steps_per_epoch`` batches on every
rank; after its last batch the position rolls to ``(e + 1, 0)`` and the next epoch
is reseeded (new shard order, shuffle, captions, augmentations). Worker processes
are started afresh each epoch (and on resume) with that epoch's plan.

Uneven data: every rank gets the same number of batches per epoch; with one source
and no resampling, the ``dropped_per_epoch`` samples at the end of the epoch's
shuffled shard order are not used in that epoch (``stats`` reports it).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from train.data.augment import Transform
from train.core.config import DataConfig
from train.core.rng import stable_seed
from train.core.configbase import ConfigError
from train.data.batch import Batch, Tokenizer, TrainLoader
from train.core.distenv import DistEnv
from train.data.shards.plan import batches_done
from train.data.shards.index import ShardSet, discover_source
from train.data.shards.stream import ShardStream, StreamSpec

log = logging.getLogger(__name__)


def _check_counts(sources: tuple[ShardSet, ...], d: DataConfig) -> None:
    """Sources without sample counts (``pipe:`` without a sizes file) cannot be cut into exact
    per-(rank, worker) ranges; resampled training draws whole shards and needs only the epoch
    length."""
    unknown = [s.name for s in sources if not s.sizes]
    if unknown and not (d.resampled and d.samples_per_epoch):
        raise ConfigError(
            f"data.shards: the sample counts of {unknown[0]} are unknown (a pipe: command cannot be "
            "looked into): give data.shards[].sizes (a sizes.json path or URL) for the exact split, "
            "or set data.resampled=true and data.samples_per_epoch"
        )


class ShardTrainLoader(TrainLoader):
    """Infinite loader over ``data.shards`` for one rank (see module docstring)."""

    def __init__(self, data: DataConfig, seed: int, env: DistEnv, tokenizer: Tokenizer, transform: Transform) -> None:
        super().__init__()
        d = data
        if any(s.weight < 0 for s in d.shards) or sum(s.weight for s in d.shards) <= 0:
            weights = [s.weight for s in d.shards]
            raise ConfigError(f"data.shards weights must be >= 0 with a positive sum, got {weights}")
        self.sources = tuple(discover_source(s, d.remote) for s in d.shards if s.weight > 0)
        _check_counts(self.sources, d)
        self.tokenizer, self.transform = tokenizer, transform
        self.rank, self.world = env.rank, env.world_size
        self.workers = max(1, d.workers)
        self._in_process = d.workers == 0
        self.batch_size = d.batch_size
        self.seed = seed
        self._d = d
        self.samples_per_epoch = d.samples_per_epoch or sum(s.total for s in self.sources)
        global_batch = self.batch_size * self.world
        self.steps_per_epoch = self.samples_per_epoch // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"samples_per_epoch={self.samples_per_epoch} is smaller than one global batch "
                f"({self.batch_size} x {self.world} ranks)"
            )
        self.dropped_per_epoch = self.samples_per_epoch - self.steps_per_epoch * global_batch
        if self.dropped_per_epoch and env.is_main:
            log.info("each epoch leaves out %d of %d samples (not a multiple of the global batch %d)",
                     self.dropped_per_epoch, self.samples_per_epoch, global_batch)
        self._totals: Counter = Counter()
        self.set_epoch(0)

    # -- position --------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._done = epoch, 0
        self._cursors = [0] * self.workers
        self._counters: list[dict] = [{} for _ in range(self.workers)]
        self._cuts: list[dict] = [{} for _ in range(self.workers)]

    def _fingerprint(self) -> dict:
        return {
            "world": self.world, "workers": self.workers, "batch_size": self.batch_size,
            "seed": self.seed, "samples_per_epoch": self.samples_per_epoch,
            "resampled": self._d.resampled, "shuffle_buffer": self._d.shuffle_buffer,
            "sources": [[s.name, s.total, s.weight] for s in self.sources],
        }

    def state_dict(self) -> dict:
        return {
            "kind": "shards", "rank": self.rank, "epoch": self._epoch, "batches": self._done,
            "cursors": list(self._cursors), "counters": [dict(c) for c in self._counters],
            "cuts": [dict(c) for c in self._cuts],
            "totals": dict(self._totals), "config": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; raise if the data plan differs (world, workers, sources, ...).

        A state saved by another rank gives the same (epoch, batch) position with this
        rank's cursors assumed clean (exact unless that rank skipped bad samples).
        """
        if state.get("kind") != "shards":
            raise ValueError(f"not a shard loader state: kind={state.get('kind')!r}")
        mine = self._fingerprint()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if diff:
            raise ConfigError(f"cannot resume the data position exactly, the plan changed (saved, now): {diff}")
        self.set_epoch(int(state["epoch"]))
        self._done = int(state["batches"])
        self._totals = Counter(state.get("totals", {}))
        if state.get("rank") == self.rank:
            self._cursors = [int(c) for c in state["cursors"]]
            self._counters = [dict(c) for c in state["counters"]]
            self._cuts = [dict(c) for c in state.get("cuts", self._cuts)]
        else:
            log.warning("data state from rank %s loaded on rank %d: assuming no skipped samples here",
                        state.get("rank"), self.rank)
            clean = [batches_done(self._done, self.workers, w) for w in range(self.workers)]
            self._cursors = [self.batch_size * n for n in clean]

    @property
    def stats(self) -> dict[str, int]:
        total = Counter(self._totals)
        for c in self._counters:
            total.update(c)
        return {**total, "dropped_per_epoch": self.dropped_per_epoch}

    # -- iteration -------------------------------------------------------------------
    def _spec(self) -> StreamSpec:
        d = self._d
        total_weight = sum(s.weight for s in self.sources)
        return StreamSpec(
            sources=self.sources, probs=tuple(s.weight / total_weight for s in self.sources),
            seed=self.seed, epoch=self._epoch, rank=self.rank, world=self.world,
            workers=self.workers, batch_size=self.batch_size, steps=self.steps_per_epoch,
            resampled=d.resampled, shuffle_buffer=d.shuffle_buffer, caption_mode=d.caption_sampling,
            start_batches=self._done, cursors=tuple(self._cursors), counters=tuple(self._counters),
            cuts=tuple(self._cuts), remote=d.remote,
        )

    def _advance(self, meta: dict) -> None:
        expected = self._done % self.workers
        if meta["worker"] != expected:
            raise RuntimeError(f"batch from worker {meta['worker']}, expected worker {expected}")
        self._cursors[meta["worker"]] = meta["cursor"]
        self._counters[meta["worker"]] = meta["counters"]
        self._cuts[meta["worker"]] = meta["cuts"]
        self._done += 1
        if self._done == self.steps_per_epoch:
            for c in self._counters:
                self._totals.update(c)
            self.set_epoch(self._epoch + 1)

    def _batches(self) -> Iterator[Batch]:
        while True:
            epoch = self._epoch
            stream = ShardStream(self._spec(), self.tokenizer, self.transform)
            if self._in_process:
                source: Iterator = iter(stream)
            else:
                d = self._d
                # Its own generator: building a DataLoader draws a base seed, and from the global
                # generator that draw would shift patch dropout's stream on resume (the loader is
                # built at the first batch, after the RNG state was restored).
                seed = torch.Generator().manual_seed(stable_seed("dataloader", self.seed, epoch, self.rank))
                source = iter(DataLoader(
                    stream, batch_size=None, num_workers=self.workers, prefetch_factor=d.prefetch_factor,
                    pin_memory=d.pin_memory and torch.cuda.is_available(), generator=seed,
                ))
            for batch, meta in source:
                self._advance(meta)
                yield batch
            if self._epoch == epoch:
                raise RuntimeError(f"epoch {epoch} ended after {self._done} of {self.steps_per_epoch} batches")
