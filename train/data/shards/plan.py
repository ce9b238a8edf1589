"""Which samples each (rank, worker) stream reads in an epoch, and in what batch order.

Bookkeeping, shared by the loader and its workers:

* ``steps`` batches per rank per epoch (``samples_per_epoch // (batch_size * world)``).
  Batch ``j`` of a rank's epoch comes from logical worker ``j % workers`` (the
  DataLoader interleaves workers round-robin), so worker ``w`` makes
  ``len(range(w, steps, workers))`` batches.
* Stream ``k = rank * workers + w`` gets a quota of ``batch_size`` x its batch count.
* Non-resampled: the epoch's shard order is a seeded permutation (same on every
  rank); the concatenated samples are cut into contiguous ranges, one per stream, in
  proportion to the quotas. With one source only the first ``steps * batch_size *
  world`` samples are used: every rank gets the same number of batches and the
  remainder (``dropped``) is left out of that epoch (next epoch reshuffles shards, so
  a different remainder is dropped). With several sources each source's whole set is
  cut up and streams are mixed by weight (a source that runs out repeats).
* A range becomes :class:`Segment`s: (shard, first sample, end sample); a stream
  reads whole shards except at its two ends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from train.core.rng import stable_seed


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (positions within the tar) of shard ``url`` of size ``size``;
    ``stop = size = None``: the whole tar, whose count is unknown (resampled ``pipe:`` shards)."""

    url: str
    start: int
    stop: int | None
    size: int | None

    @classmethod
    def whole(cls, url: str, size: int | None) -> "Segment":
        """All samples of a tar."""
        return cls(url, 0, size, size)


def worker_batches(steps: int, workers: int, worker: int) -> int:
    """Batches logical worker ``worker`` makes in an epoch of ``steps`` batches."""
    return len(range(worker, steps, workers))


def batches_done(consumed: int, workers: int, worker: int) -> int:
    """How many of worker ``worker``'s batches are among the first ``consumed`` of the epoch."""
    return len(range(worker, consumed, workers))


def stream_quotas(steps: int, batch_size: int, world: int, workers: int) -> list[int]:
    """Samples each stream ``k = rank * workers + w`` must deliver per epoch."""
    return [batch_size * worker_batches(steps, workers, w) for _ in range(world) for w in range(workers)]


def shard_permutation(seed: int, epoch: int, source: int, n: int) -> list[int]:
    """The epoch's shard order of a source; identical on every rank and worker."""
    order = list(range(n))
    random.Random(stable_seed("shard-order", seed, epoch, source)).shuffle(order)
    return order


def split_ranges(total: int, quotas: list[int]) -> list[tuple[int, int]]:
    """Cut ``[0, total)`` into contiguous ranges proportional to ``quotas`` (exact if equal sums)."""
    qsum = sum(quotas)
    bounds, cum = [0], 0
    for q in quotas:
        cum += q
        bounds.append(total * cum // qsum if qsum else 0)
    return list(zip(bounds[:-1], bounds[1:]))


def segments(urls: list[str], sizes: list[int], start: int, stop: int) -> list[Segment]:
    """The shard pieces covering samples ``[start, stop)`` of the concatenated shards."""
    out, offset = [], 0
    for url, size in zip(urls, sizes):
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            out.append(Segment(url, lo - offset, hi - offset, size))
        offset += size
    return out


def stream_segments(
    urls: tuple[str, ...],
    sizes: tuple[int, ...],
    *,
    seed: int,
    epoch: int,
    source: int,
    stream: int,
    quotas: list[int],
    exact: bool,
) -> list[Segment]:
    """Segments that stream ``stream`` reads from one source in ``epoch``.

    Args:
        exact: Single-source mode: use only the first ``sum(quotas)`` samples, so every
            stream's range is exactly its quota (the rest is the epoch's dropped remainder).
    """
    order = shard_permutation(seed, epoch, source, len(urls))
    o_urls, o_sizes = [urls[i] for i in order], [sizes[i] for i in order]
    total = sum(o_sizes)
    used = min(total, sum(quotas)) if exact else total
    start, stop = split_ranges(used, quotas)[stream]
    return segments(o_urls, o_sizes, start, stop)
