"""The types every loader shares: :class:`Batch`, the :class:`TrainLoader` interface, tokenizers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


Tokenizer = Callable[[list[str]], torch.Tensor]
"""Captions -> LongTensor[N, context_length]; must be picklable for worker processes."""


@dataclass
class Batch:
    """One rank's batch for one optimizer step."""

    images: torch.Tensor
    """uint8 [B, 3, H, W] pixels, as the loaders make them (the engines normalize them on the
    device), or float32 already normalized (any other transform; tests)."""
    texts: torch.Tensor
    """long [B, context_length]."""
    keys: list[str]
    """Sample keys, for tracing a bad step back to its data."""

    @classmethod
    def empty(cls, n: int, image_size: int, context_length: int) -> "Batch":
        """An uninitialized batch of ``n`` samples in the loaders' layout (the memory planner counts it)."""
        return cls(torch.empty(n, 3, image_size, image_size, dtype=torch.uint8),
                   torch.empty(n, context_length, dtype=torch.long), [str(i) for i in range(n)])

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        return Batch(self.images.pin_memory(), self.texts.pin_memory(), self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class TrainLoader:
    """Infinite iterable of :class:`Batch` with an exact, resumable position.

    Subclasses implement :meth:`_batches` (a generator that updates the position
    *before* yielding each batch) and the state methods. ``iter()`` starts from the
    current position, so call it again after :meth:`load_state_dict`.
    """

    samples_per_epoch: int
    steps_per_epoch: int
    """Optimizer steps per epoch (global): samples_per_epoch // (batch_size * world)."""

    def __init__(self) -> None:
        self.wait_seconds = 0.0
        """Total time spent blocked waiting for the next batch."""

    def _batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        it = self._batches()
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            finally:
                self.wait_seconds += time.perf_counter() - t0
            yield batch

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The exact position: the next batch is the one after the last one yielded."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Restore a position from :meth:`state_dict` (same config, world and workers)."""
        raise NotImplementedError

    @property
    def stats(self) -> dict[str, int]:
        """Counters: skipped samples by reason, repeats, dropped remainder."""
        return {}


class CachedTokenizer:
    """Memoizes a deterministic tokenizer per caption (one per worker process).

    Captions repeat: template captions (30 per EuroSAT epoch), RSICD's five captions per
    image seen every epoch. BPE per caption was ~10 % of a worker's time per sample.
    """

    def __init__(self, tokenizer: Tokenizer, max_entries: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            if len(self._cache) + len(missing) > self.max_entries:
                self._cache.clear()  # bounded memory; rare with real caption sets
            self._cache.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self._cache[c] for c in captions])
