"""Deterministic shard writing on top of ``webdataset.TarWriter``."""

from __future__ import annotations

import os
from pathlib import Path

import webdataset as wds

#: Fixed tar member mtime (TarWriter would otherwise stamp the current time).
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z
# Rough per-sample tar overhead: one 512-byte header per member plus padding.
_TAR_OVERHEAD = 3 * 1024


class SplitShardWriter:
    """Writes one split's samples to ``<dir>/<split>-NNNNNN.tar``.

    A new shard starts when the current one holds ``max_count`` samples or the
    next sample would push it past ``max_bytes`` (a shard always takes at least
    one sample). Unlike ``wds.ShardWriter`` no empty shard is created for an
    empty split, and the byte limit is checked before writing.
    """

    def __init__(self, out_dir: Path, split: str, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("shard size and shard bytes must be positive")
        self.out_dir = out_dir
        self.split = split
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.sizes: dict[str, int] = {}
        self._tar: wds.TarWriter | None = None
        self._name = ""
        self._bytes = 0

    def _open_next(self) -> None:
        self._close_current()
        self._name = f"{self.split}-{len(self.sizes):06d}.tar"
        self.sizes[self._name] = 0
        self._bytes = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # uid/gid stay 0 (TarInfo default); user/group names and mode are fixed.
        self._tar = wds.TarWriter(
            os.fspath(self.out_dir / self._name),
            user="orbitclip", group="orbitclip", mode=0o444,
            encoder=False, mtime=FIXED_MTIME,
        )

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> str:
        """Write one sample (``{"jpg": b.., "txt": b.., "json": b..}``); return its shard name."""
        size = sum(len(v) for v in members.values()) + _TAR_OVERHEAD
        if self._tar is None or self.sizes[self._name] >= self.max_count or (
            self.sizes[self._name] > 0 and self._bytes + size > self.max_bytes
        ):
            self._open_next()
        assert self._tar is not None
        self._tar.write({"__key__": key, **members})
        self.sizes[self._name] += 1
        self._bytes += size
        return self._name

    def close(self) -> dict[str, int]:
        """Finish the last shard; return ``{shard name: sample count}``."""
        self._close_current()
        return dict(self.sizes)
