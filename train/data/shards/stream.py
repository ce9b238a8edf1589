"""Worker side of the shard loader: read, shuffle, mix, decode and batch one stream.

A :class:`ShardStream` is handed to ``torch.utils.data.DataLoader`` (or iterated in
process when ``data.workers=0``). Each worker process plays one *logical* worker
``w`` of this rank and yields ``(Batch, meta)`` for the epoch's batches
``j = w, w + W, ...`` (see :mod:`train.data.shards.plan`). ``meta["cursor"]`` counts raw
samples this stream has consumed, so a resumed worker fast-forwards by skipping that
many raw (undecoded) samples. All per-sample randomness comes from
``stable_seed(seed, epoch, source, key, pass)``: it does not depend on the worker
that happens to read the sample or on timing.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from train.data.augment import Transform, TrainTransform
from train.data.batch import Batch, Tokenizer
from train.data.shards.plan import Segment, batches_done, stream_quotas, stream_segments, worker_batches
from train.data.decode import BadSample, decode_sample, decode_sample_into
from train.core.rng import stable_seed
from train.data.shards.index import ShardSet

log = logging.getLogger(__name__)

MAX_BAD_RUN = 1000
"""Consecutive unusable samples after which a stream gives up (the data is broken, not noisy)."""
LOG_FIRST_BAD = 20
"""Skipped samples logged one by one per worker; after that every 1000th."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs for one epoch of one rank (picklable)."""

    sources: tuple[ShardSet, ...]
    probs: tuple[float, ...]
    seed: int
    epoch: int
    rank: int
    world: int
    workers: int
    batch_size: int
    steps: int
    """Batches per rank in this epoch."""
    resampled: bool
    shuffle_buffer: int
    caption_mode: str
    start_batches: int = 0
    """Batches of this epoch already consumed (resume)."""
    cursors: tuple[int, ...] = ()
    """Raw samples already consumed per logical worker (resume); empty = all zero."""
    counters: tuple[dict, ...] = ()
    """Counters per logical worker at the resume point."""


def _read_segments(segs: Iterable[Segment], counters: Counter) -> Iterator[tuple[int, dict]]:
    """Raw samples of each segment as ``(segment number, sample)``; tar errors are counted."""
    for n, seg in enumerate(segs):

        def handler(exn: Exception, url: str = seg.url) -> bool:
            counters["skipped/tar_error"] += 1
            log.warning("skipping unreadable tar data in %s: %s", url, exn)
            return True

        i = 0
        for raw in wds.tariterators.tarfile_samples([{"url": seg.url}], handler=handler):
            if i >= seg.stop:
                if seg.stop < seg.size:
                    break  # the rest of this shard belongs to another stream
                counters["beyond_sizes_json"] += 1  # never read: sizes.json undercounts
            elif i >= seg.start:
                yield n, raw
            i += 1
        if i < seg.stop:
            counters["short_shard"] += seg.stop - max(i, seg.start)
            log.warning("%s has %d samples, sizes say %d", seg.url, i, seg.size)


class ShardStream(IterableDataset):
    """One epoch of one rank's batches, cut among DataLoader workers."""

    def __init__(self, spec: StreamSpec, tokenizer: Tokenizer, transform: Transform) -> None:
        super().__init__()
        self.spec = spec
        self.tokenizer = tokenizer
        self.transform = transform

    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        info = get_worker_info()
        slot, nslots = (info.id, info.num_workers) if info is not None else (0, 1)
        if nslots != self.spec.workers:
            raise RuntimeError(f"stream planned for {self.spec.workers} workers, run by {nslots}")
        # The DataLoader always starts with its worker 0; rotating roles makes worker 0
        # produce batch `start_batches` after a resume in the middle of a round.
        yield from self._worker((slot + self.spec.start_batches) % nslots)

    def _shuffled(self, raw: Iterator, *seed_parts: object) -> Iterator:
        if self.spec.shuffle_buffer <= 1:
            return raw
        bufsize = self.spec.shuffle_buffer
        return wds.shuffle(bufsize, min(100, bufsize), seed=stable_seed("buffer", *seed_parts))(raw)

    def _source_stream(self, s: int, w: int, counters: Counter) -> Iterator[tuple[int, int, dict]]:
        """Endless ``(source, pass, raw)`` of source ``s`` for logical worker ``w``."""
        sp, src = self.spec, self.spec.sources[s]
        ident = (sp.seed, sp.epoch, sp.rank, w, s)
        if sp.resampled:
            rng = random.Random(stable_seed("resample", *ident))
            picks = (rng.choices(range(len(src.urls)), weights=src.sizes)[0] for _ in itertools.count())
            segs = (Segment(src.urls[i], 0, src.sizes[i], src.sizes[i]) for i in picks)
            # pass = draw number, so a shard drawn twice gets fresh augmentations
            for d, raw in self._shuffled(_read_segments(segs, counters), *ident):
                yield s, d, raw
            return
        quotas = stream_quotas(sp.steps, sp.batch_size, sp.world, sp.workers)
        segs = stream_segments(
            src.urls, src.sizes, seed=sp.seed, epoch=sp.epoch, source=s,
            stream=sp.rank * sp.workers + w, quotas=quotas, exact=len(sp.sources) == 1,
        )
        if not segs:  # a tiny source spread over many streams: each reads all of it
            segs = [Segment(u, 0, n, n) for u, n in zip(src.urls, src.sizes) if n]
        for p in itertools.count():
            got = 0
            for _, raw in self._shuffled(_read_segments(segs, counters), *ident, p):
                got += 1
                if p:
                    counters["repeated"] += 1
                yield s, p, raw
            if got == 0:
                raise RuntimeError(f"source {src.name}: no readable samples in {len(segs)} shard segment(s)")

    def _raw_stream(self, w: int, counters: Counter) -> Iterator[tuple[int, int, dict]]:
        subs = [self._source_stream(s, w, counters) for s in range(len(self.spec.sources))]
        if len(subs) == 1:
            yield from subs[0]
            return
        rng = random.Random(stable_seed("mix", self.spec.seed, self.spec.epoch, self.spec.rank, w))
        choices = range(len(subs))
        while True:
            yield next(subs[rng.choices(choices, weights=self.spec.probs)[0]])

    def _worker(self, w: int) -> Iterator[tuple[Batch, dict]]:
        sp = self.spec
        counters: Counter = Counter()
        raw = self._raw_stream(w, counters)
        cursor = sp.cursors[w] if sp.cursors else 0
        for _ in range(cursor):  # fast-forward without decoding
            next(raw)
        counters.clear()
        counters.update(sp.counters[w] if sp.counters else {})
        multi = len(sp.sources) > 1
        first, end = batches_done(sp.start_batches, sp.workers, w), worker_batches(sp.steps, sp.workers, w)
        for _ in range(first, end):
            images, captions, keys = self._new_images(), [], []
            bad_run = 0
            while len(keys) < sp.batch_size:
                s, p, sample = next(raw)
                cursor += 1
                key = sample["__key__"]
                try:
                    seed = stable_seed("sample", sp.seed, sp.epoch, s, key, p)
                    if isinstance(images, list):
                        image, caption = decode_sample(sample, self.transform, sp.caption_mode, seed)
                        images.append(image)
                    else:
                        caption = decode_sample_into(sample, self.transform, sp.caption_mode, seed,
                                                     images[len(keys)])
                except BadSample as e:
                    counters[f"skipped/{e.reason}"] += 1
                    n_bad = sum(v for k, v in counters.items() if k.startswith("skipped/"))
                    if n_bad <= LOG_FIRST_BAD or n_bad % 1000 == 0:  # keep logs readable on bad data
                        log.warning("skipping sample %s of %s: %s (%d skipped by this worker)",
                                    key, sample.get("__url__"), e, n_bad)
                    bad_run += 1
                    if bad_run > MAX_BAD_RUN:
                        raise RuntimeError(f"{bad_run} unusable samples in a row; last: {key}: {e}") from e
                    continue
                bad_run = 0
                captions.append(caption)
                keys.append(f"{s}/{key}" if multi else key)
            stacked = torch.stack(images) if isinstance(images, list) else images
            batch = Batch(stacked, self.tokenizer(captions), keys)
            yield batch, {"worker": w, "cursor": cursor, "counters": dict(counters)}

    def _new_images(self) -> torch.Tensor | list:
        """The batch's image tensor, filled in place (a list for transforms of unknown size).

        In a DataLoader worker it is allocated in shared memory, as torch's own
        ``default_collate`` does, so handing the batch to the main process copies nothing.
        """
        if not isinstance(self.transform, TrainTransform):
            return []
        size = self.transform.image_size
        shape = (self.spec.batch_size, 3, size, size)
        if get_worker_info() is None:
            return torch.empty(shape)
        proto = torch.empty(0)
        storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
        return proto.new(storage).view(shape)
