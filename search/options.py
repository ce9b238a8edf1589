"""Typed options of the four commands (CLI flag ``--x-y`` is field ``x_y``).

Each ``validate()`` raises :class:`~search.errors.SearchError` with one clear line, so the
CLI and the Python API reject the same bad values the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from search.errors import SearchError

IndexKind = Literal["auto", "flat", "hnsw", "ivf", "ivfpq"]


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise SearchError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


@dataclass
class AnnOptions:
    """How the faiss index is chosen and built (see :mod:`search.ann`)."""

    kind: IndexKind = "auto"
    """``auto``: exact up to ``exact_max`` vectors, then HNSW, IVF or IVF-PQ by size and ``memory_mb``."""
    exact_max: int = 50_000
    """Largest collection searched exactly (brute force is fast enough and has recall 1)."""
    memory_mb: float = 4096.0
    """Budget for the faiss index in memory; decides HNSW vs IVF-PQ and IVF-PQ's code size."""
    hnsw_m: int = 32
    """HNSW graph degree (links per vector)."""
    ef_construction: int = 80
    ef_search: int = 128
    nprobe: int = 32
    """IVF lists visited per query."""
    recall_queries: int = 1000
    """Indexed vectors used as queries to measure recall@10 against exact search."""
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "exact_max", "hnsw_m", "ef_construction", "ef_search", "nprobe", "recall_queries")
        if self.memory_mb <= 0:
            raise SearchError(f"--memory-mb must be > 0, got {self.memory_mb}")


@dataclass
class IndexOptions:
    """``python -m search index``."""

    model: str
    shards: list[str]
    out: str
    splits: list[str] | None = None
    """Only these splits of a shards output (default: every split)."""
    device: str = "auto"
    batch_size: int = 256
    overwrite: bool = False
    progress: bool = True
    ann: AnnOptions = field(default_factory=AnnOptions)

    def validate(self) -> None:
        _positive(self, "batch_size")
        self.ann.validate()
        if not self.shards:
            raise SearchError("give at least one shard folder with --shards")
        for folder in self.shards:
            if not Path(folder).is_dir():
                raise SearchError(f"shard folder not found: {folder}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SearchError(f"--out {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise SearchError(f"--out {out} is not empty; pass --overwrite to replace the index there")


@dataclass
class QueryOptions:
    """``python -m search query``: exactly one of ``text``, ``image``, ``key``."""

    index: str
    text: str | None = None
    image: str | None = None
    key: str | None = None
    k: int = 10
    model: str | None = None
    """Model to embed the query with (default: the one the index records); must be the same model."""
    device: str = "auto"
    json: bool = False
    grid: str | None = None

    def validate(self) -> None:
        given = [name for name in ("text", "image", "key") if getattr(self, name) is not None]
        if len(given) != 1:
            raise SearchError("give exactly one of --text, --image or --key"
                              + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
        if self.text is not None and not self.text.strip():
            raise SearchError("empty query: --text needs some words, e.g. --text \"baseball field\"")
        if self.key is not None and not self.key.strip():
            raise SearchError("empty query: --key needs an item key from the index")
        _positive(self, "k")


@dataclass
class LocateOptions:
    """``python -m search locate``."""

    model: str
    image: str
    text: str
    out: str
    tile: int = 224
    stride: int | None = None
    """Step between tiles (default: half a tile, so every feature is whole in some tile)."""
    top: int = 10
    bands: list[int] | None = None
    """1-based band numbers to use as R, G, B for multi-band rasters (default 1, 2, 3)."""
    device: str = "auto"
    batch_size: int = 64
    progress: bool = True

    def validate(self) -> None:
        if not self.text.strip():
            raise SearchError("empty query: --text needs some words, e.g. --text \"storage tanks\"")
        if self.stride is None:
            self.stride = max(1, self.tile // 2)
        _positive(self, "tile", "stride", "top", "batch_size")
        if self.stride > self.tile:
            raise SearchError(f"--stride {self.stride} is larger than --tile {self.tile}: parts of the scene "
                              f"would never be scored")
        if self.bands is not None and (len(self.bands) != 3 or min(self.bands) < 1):
            raise SearchError(f"--bands needs three 1-based band numbers, e.g. 4,3,2; got {self.bands}")


@dataclass
class ServeOptions:
    """``python -m search serve``."""

    index: str
    host: str = "127.0.0.1"
    port: int = 8000
    k: int = 12
    model: str | None = None
    device: str = "auto"

    def validate(self) -> None:
        _positive(self, "k")
        if not 0 <= self.port <= 65535:
            raise SearchError(f"--port must be in 0..65535, got {self.port}")
