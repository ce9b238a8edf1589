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

import contextlib
import itertools
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from train.data.augment import Transform, TrainTransform
from train.data.batch import Batch, Tokenizer
from train.data.shards.plan import Segment, batches_done, stream_quotas, stream_segments, worker_batches
from train.data.decode import BadSample, decode_sample, decode_sample_into
from train.core.rng import stable_seed
from train.core.config import RemoteConfig
from train.data.shards.index import ShardSet
from train.data.shards.storage import ShardReader, StorageError, open_shard

log = logging.getLogger(__name__)

MAX_BAD_RUN = 1000
"""Consecutive unusable samples after which a stream gives up (the data is broken, not noisy)."""
LOG_FIRST_BAD = 20
"""Skipped samples logged one by one per worker; after that every 1000th."""
LOSS_COUNTERS = ("streams_lost", "skipped/connection_lost", "shards_unavailable", "skipped/shard_unavailable")
"""Counters of streams lost or shards not opened: network events, unlike bad data not met again on a re-read."""


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
    cuts: tuple[dict, ...] = ()
    """Per logical worker, the lost streams met before the resume point (see :class:`_Reads`)."""
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    """Timeouts and retries for shards behind URLs."""


@dataclass
class _Reads:
    """What one worker's tar reads share: counters, URL settings and the losses met so far.

    ``cuts`` maps a segment id (``source/pass/segment``) to the samples read before its
    stream was lost (0: it could not be opened). They travel with the resume position, so a
    resumed worker replays the same losses while fast-forwarding and lands on the same
    samples, even when the network is healthy again.
    """

    counters: Counter
    remote: RemoteConfig
    cuts: dict[str, int]


def _read_segments(segs: Iterable[Segment], reads: _Reads, tag: str) -> Iterator[tuple[int, dict]]:
    """Raw samples of each segment as ``(segment number, sample)``; read problems are counted."""
    for n, seg in enumerate(segs):
        for raw in _read_segment(seg, reads, f"{tag}/{n}"):
            yield n, raw


def _read_segment(seg: Segment, reads: _Reads, seg_id: str) -> Iterator[dict]:
    """Samples ``[seg.start, seg.stop)`` of one tar, counting what cannot be read.

    Counters: ``skipped/tar_error`` (events, bad tar data), ``short_shard`` (samples a tar
    lacks against its count), ``beyond_sizes_json`` (samples past its count, never read),
    ``streams_lost`` / ``skipped/connection_lost`` (streams that broke mid-tar / the samples
    they did not deliver), ``shards_unavailable`` / ``skipped/shard_unavailable`` (tars that
    could not be opened after retries / their samples). A loss replayed after a resume
    (``reads.cuts``) was counted before the checkpoint and is not counted again.
    """
    counters, cut = reads.counters, reads.cuts.get(seg_id)
    reader = None if cut == 0 else _open_counted(seg, reads, seg_id)
    if reader is None:
        return

    def handler(exn: Exception) -> bool:
        if reader.lost:  # the tar reader stumbling after a lost stream: counted once, below
            return True
        counters["skipped/tar_error"] += 1
        log.warning("skipping unreadable tar data in %s: %s", seg.url, exn)
        return True

    i = 0
    with contextlib.closing(reader):
        files = wds.tariterators.tar_file_expander([{"url": seg.url, "stream": reader}], handler=handler)
        for raw in wds.tariterators.group_by_keys(files, handler=handler):
            if reader.lost:
                break  # the sample being assembled when the stream broke may lack files: dropped
            if seg.stop is not None and i >= seg.stop:
                if seg.size is not None and seg.stop < seg.size:
                    break  # the rest of this shard belongs to another stream
                counters["beyond_sizes_json"] += 1  # never read: sizes.json undercounts
            elif i >= seg.start:
                yield raw
            i += 1
            if cut is not None and i >= cut:
                return  # a loss met before the resume: stop where that stream stopped, read no further
    _count_end(seg, reads, seg_id, reader, i)


def _open_counted(seg: Segment, reads: _Reads, seg_id: str) -> ShardReader | None:
    """The tar's reader, or None (counted, logged, recorded for resume) if it cannot be opened."""
    try:
        return open_shard(seg.url, reads.remote)
    except StorageError as e:
        reads.cuts[seg_id] = 0
        missing = _unread(seg, 0)
        reads.counters["shards_unavailable"] += 1
        reads.counters["skipped/shard_unavailable"] += missing or 0
        log.warning("cannot open %s, %s samples of it skipped (skipped/shard_unavailable): %s",
                    seg.url, "all" if missing is None else missing, e)
        return None


def _count_end(seg: Segment, reads: _Reads, seg_id: str, reader: ShardReader, read: int) -> None:
    """Count (and log once) what a tar that ended after ``read`` samples did not deliver."""
    missing = _unread(seg, read)
    if reader.lost:
        reads.cuts[seg_id] = read
        reads.counters["streams_lost"] += 1
        reads.counters["skipped/connection_lost"] += missing or 0
        log.warning("lost %s after %d bytes (%s): %s of its samples not read (skipped/connection_lost); "
                    "training goes on", seg.url, reader.received, reader.lost,
                    "the rest" if missing is None else missing)
    elif missing:
        reads.counters["short_shard"] += missing
        log.warning("%s has %d samples, sizes say %d", seg.url, read, seg.size)


def _unread(seg: Segment, read: int) -> int | None:
    """Samples of ``seg`` not delivered when its tar ended after ``read`` samples (None: unknown count)."""
    if seg.stop is None:
        return None
    return max(0, seg.stop - max(read, seg.start))


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

    def _source_stream(self, s: int, w: int, reads: _Reads) -> Iterator[tuple[int, int, dict]]:
        """Endless ``(source, pass, raw)`` of source ``s`` for logical worker ``w``."""
        sp, src = self.spec, self.spec.sources[s]
        ident = (sp.seed, sp.epoch, sp.rank, w, s)
        if sp.resampled:
            rng = random.Random(stable_seed("resample", *ident))
            # Unknown counts (pipe: without a sizes file): every shard is equally likely.
            weights = src.sizes or None
            picks = (rng.choices(range(len(src.urls)), weights=weights)[0] for _ in itertools.count())
            segs = (Segment.whole(src.urls[i], src.sizes[i] if src.sizes else None) for i in picks)
            # pass = draw number, so a shard drawn twice gets fresh augmentations
            for d, raw in self._shuffled(_read_segments(segs, reads, f"{s}/0"), *ident):
                yield s, d, raw
            return
        quotas = stream_quotas(sp.steps, sp.batch_size, sp.world, sp.workers)
        segs = stream_segments(
            src.urls, src.sizes, seed=sp.seed, epoch=sp.epoch, source=s,
            stream=sp.rank * sp.workers + w, quotas=quotas, exact=len(sp.sources) == 1,
        )
        if not segs:  # a tiny source spread over many streams: each reads all of it
            segs = [Segment.whole(u, n) for u, n in zip(src.urls, src.sizes) if n]
        for p in itertools.count():
            got = 0
            for _, raw in self._shuffled(_read_segments(segs, reads, f"{s}/{p}"), *ident, p):
                got += 1
                if p:
                    reads.counters["repeated"] += 1
                yield s, p, raw
            if got == 0:
                raise RuntimeError(f"source {src.name}: no readable samples in {len(segs)} shard segment(s)")

    def _raw_stream(self, w: int, reads: _Reads) -> Iterator[tuple[int, int, dict]]:
        subs = [self._source_stream(s, w, reads) for s in range(len(self.spec.sources))]
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
        reads = _Reads(counters, sp.remote, dict(sp.cuts[w]) if sp.cuts else {})
        raw = self._raw_stream(w, reads)
        cursor = sp.cursors[w] if sp.cursors else 0
        for _ in range(cursor):  # fast-forward without decoding
            next(raw)
        # What the fast-forward met again was counted before the checkpoint; a stream lost
        # only now (replayed losses are not counted) is new.
        fresh = {k: v for k, v in counters.items() if k in LOSS_COUNTERS}
        counters.clear()
        counters.update(sp.counters[w] if sp.counters else {})
        counters.update(fresh)
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
            yield batch, {"worker": w, "cursor": cursor, "counters": dict(counters), "cuts": dict(reads.cuts)}

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
            return torch.empty(shape, dtype=torch.uint8)
        proto = torch.empty(0, dtype=torch.uint8)
        storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
        return proto.new(storage).view(shape)
