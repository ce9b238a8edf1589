"""Find the tar shards of one training source and how many samples each holds.

Three layouts are read as they are:

* a ``shards`` output folder: ``DIR/<split>/sizes.json`` names the tars and their counts
  (a folder holding ``sizes.json`` directly works too);
* an img2dataset output folder: ``00000.tar`` next to ``00000_stats.json``, whose
  ``"successes"`` is the sample count;
* a brace pattern ``dir/{000000..000009}.tar``: counts from ``sizes.json`` in the tars'
  folder, else each tar's ``*_stats.json``.

Exact per-shard counts are needed because each epoch is cut into contiguous sample
ranges per (rank, worker) (see :mod:`train.data.shards.plan`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from train.core.config import ShardSourceConfig
from train.core.errors import UserError


class ShardIndexError(UserError, ValueError):
    """A shard source cannot be found or its sample counts are unknown."""


@dataclass(frozen=True)
class ShardSet:
    """The shards of one source: URLs (local paths) and their sample counts."""

    name: str
    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    weight: float = 1.0

    @property
    def total(self) -> int:
        """Samples in the whole source."""
        return sum(self.sizes)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ShardIndexError(f"cannot read {path}: {e}") from e


def _stats_count(tar: Path) -> int | None:
    """img2dataset's count for ``00000.tar`` from ``00000_stats.json``, if present."""
    stats = tar.with_name(tar.name[: -len(".tar")] + "_stats.json")
    if not stats.is_file():
        return None
    data = _read_json(stats)
    if "successes" not in data:
        raise ShardIndexError(f"{stats} has no 'successes' count")
    return int(data["successes"])


def _from_sizes_json(folder: Path) -> tuple[list[str], list[int]]:
    sizes = _read_json(folder / "sizes.json")
    urls, counts = [], []
    for name in sorted(sizes):
        tar = folder / name
        if not tar.is_file():
            raise ShardIndexError(f"{folder / 'sizes.json'} lists {name}, which does not exist")
        urls.append(str(tar))
        counts.append(int(sizes[name]))
    return urls, counts


def _counts_for(tars: list[Path]) -> list[int]:
    sizes_cache: dict[Path, dict] = {}
    counts = []
    for tar in tars:
        sizes_file = tar.parent / "sizes.json"
        if sizes_file.is_file():
            sizes = sizes_cache.setdefault(tar.parent, _read_json(sizes_file))
            if tar.name in sizes:
                counts.append(int(sizes[tar.name]))
                continue
        n = _stats_count(tar)
        if n is None:
            raise ShardIndexError(
                f"unknown sample count for {tar}: no sizes.json entry and no "
                f"{tar.stem}_stats.json (build shards with `python -m shards`)"
            )
        counts.append(n)
    return counts


def _missing_folder(src: ShardSourceConfig) -> str:
    """One line: what is missing (relative paths are the current directory's) and how to build it."""
    where = "" if Path(src.path).is_absolute() else f" (relative to the current directory {Path.cwd()})"
    how = src.build or f"python -m shards build --source ... --output {src.path}"
    return f"training shards {src.path} not found{where}; build them first: {how}"


def discover_source(src: ShardSourceConfig) -> ShardSet:
    """Resolve one ``data.shards`` entry into its shard list and counts.

    Raises:
        ShardIndexError: Nothing found, a listed tar is missing, or counts are unknown.
    """
    path = src.path
    if not path:
        raise ShardIndexError("data.shards entry has an empty path")
    if "{" in path or path.endswith(".tar"):
        tars = [Path(u) for u in wds.shardlists.expand_urls(path)]
        missing = [str(t) for t in tars if not t.is_file()]
        if missing:
            raise ShardIndexError(f"{len(missing)} shard(s) of {path} do not exist, e.g. {missing[0]}"
                                  + (f"; build them with: {src.build}" if src.build else ""))
        urls, counts = [str(t) for t in tars], _counts_for(tars)
    else:
        root = Path(path)
        if not root.exists():
            raise ShardIndexError(_missing_folder(src))
        if (root / src.split / "sizes.json").is_file():
            urls, counts = _from_sizes_json(root / src.split)
        elif (root / "sizes.json").is_file():
            urls, counts = _from_sizes_json(root)
        else:
            folder = root / src.split if (root / src.split).is_dir() else root
            tars = sorted(folder.glob("*.tar"))
            if not tars:
                raise ShardIndexError(f"no sizes.json and no *.tar shards in {folder}")
            urls, counts = [str(t) for t in tars], _counts_for(tars)
    if sum(counts) <= 0:
        raise ShardIndexError(f"source {path} holds no samples")
    return ShardSet(name=path, urls=tuple(urls), sizes=tuple(counts), weight=float(src.weight))
