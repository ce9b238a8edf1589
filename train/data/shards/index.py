"""Find the tar shards of one training source and how many samples each holds.

Three layouts are read as they are, from local paths or URLs (``http(s)://``, ``s3://``,
``gs://``, other fsspec URLs; see :mod:`train.data.shards.storage`):

* a ``shards`` output folder: ``DIR/<split>/sizes.json`` names the tars and their counts
  (a folder holding ``sizes.json`` directly works too);
* an img2dataset output folder: ``00000.tar`` next to ``00000_stats.json``, whose
  ``"successes"`` is the sample count (needs a folder that can be listed: local or fsspec,
  not http(s));
* a brace pattern ``dir/{000000..000009}.tar`` (or one ``.tar``): counts from ``sizes.json``
  in the tars' folder, else each tar's ``*_stats.json``, or from ``data.shards[].sizes``.

``pipe:CMD`` sources (``pipe:curl -s https://host/train-{000000..000009}.tar``) cannot be
looked into: their counts come from ``data.shards[].sizes``, matched by the ``*.tar`` name in
each command; without it the counts stay unknown (empty ``sizes``), which only resampled
training accepts (the loader checks).

Exact per-shard counts are needed because each epoch is cut into contiguous sample
ranges per (rank, worker) (see :mod:`train.data.shards.plan`).
"""

from __future__ import annotations

import json
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit
from pathlib import Path

import webdataset as wds

from train.core.config import RemoteConfig, ShardSourceConfig
from train.core.errors import UserError
from train.data.shards import storage
from train.data.shards.storage import Denied, NotFound

STATS_THREADS = 16
"""Concurrent reads of remote img2dataset ``*_stats.json`` files (one request each)."""


class ShardIndexError(UserError, ValueError):
    """A shard source cannot be found or its sample counts are unknown."""


@dataclass(frozen=True)
class ShardSet:
    """The shards of one source: URLs (local paths, URLs or ``pipe:`` commands) and their
    sample counts; ``sizes`` is empty when the counts are unknown (``pipe:`` without a sizes file)."""

    name: str
    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    weight: float = 1.0

    @property
    def total(self) -> int:
        """Samples in the whole source (0 when unknown)."""
        return sum(self.sizes)


def _read_json(url: str, opts: RemoteConfig) -> dict:
    data = storage.read_bytes(url, opts)
    try:
        table = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardIndexError(f"cannot read {url}: {e}") from e
    if not isinstance(table, dict):
        raise ShardIndexError(f"{url} is not a JSON object")
    return table


def _maybe_json(url: str, opts: RemoteConfig) -> dict | None:
    try:
        return _read_json(url, opts)
    except NotFound:
        return None


def _count(value: object, where: str) -> int:
    try:
        n = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise ShardIndexError(f"{where}: {value!r} is not a sample count")
    return n


def _stats_count(tar: str, opts: RemoteConfig) -> int | None:
    """img2dataset's count for ``00000.tar`` from ``00000_stats.json``, if present."""
    stats = tar[: -len(".tar")] + "_stats.json"
    data = _maybe_json(stats, opts)
    if data is None:
        return None
    if "successes" not in data:
        raise ShardIndexError(f"{stats} has no 'successes' count")
    return _count(data["successes"], stats)


def _from_sizes_json(folder: str, sizes_url: str, sizes: dict, opts: RemoteConfig) -> tuple[list[str], list[int]]:
    urls = [storage.join(folder, name) for name in sorted(sizes)]
    counts = [_count(sizes[name], f"{sizes_url}[{name!r}]") for name in sorted(sizes)]
    # Every local tar is checked; remote ones once (the first), to catch a wrong folder at start
    # without a request per shard per rank. A remote tar missing later is counted when read.
    checks = urls if storage.location_kind(folder) == "local" else urls[:1]
    for url in checks:
        if storage.exists(url, opts) is False:
            raise ShardIndexError(f"{sizes_url} lists {storage.file_name(url)}, but {url} does not exist")
    return urls, counts


def _counts_for(tars: list[str], opts: RemoteConfig) -> list[int]:
    """Counts from sizes.json in each tar's folder, else from each tar's ``*_stats.json``."""
    tables = {f: _maybe_json(storage.join(f, "sizes.json"), opts) for f in dict.fromkeys(map(storage.parent, tars))}
    counts: list[int | None] = []
    for tar in tars:
        table, name = tables[storage.parent(tar)], storage.file_name(tar)
        counts.append(_count(table[name], f"sizes.json of {tar}") if table and name in table else None)
    missing = [i for i, n in enumerate(counts) if n is None]
    remote = any(storage.location_kind(tars[i]) != "local" for i in missing)
    with ThreadPoolExecutor(STATS_THREADS if remote and len(missing) > 1 else 1) as pool:
        found = list(pool.map(lambda i: _stats_count(tars[i], opts), missing))
    for i, n in zip(missing, found):
        if n is None:
            raise ShardIndexError(
                f"unknown sample count for {tars[i]}: no sizes.json entry and no "
                f"{storage.file_name(tars[i])[: -len('.tar')]}_stats.json (build shards with `python -m shards`, "
                "or give data.shards[].sizes)"
            )
        counts[i] = n
    return [int(n) for n in counts if n is not None]


def pipe_shard_name(command: str) -> str:
    """The tar a ``pipe:`` command reads: the one ``*.tar`` file name among its words.

    Raises:
        ShardIndexError: No word or several different words name a ``.tar``.
    """
    body = command[len("pipe:"):]
    try:
        words = shlex.split(body)
    except ValueError:
        words = body.split()
    names = sorted({urlsplit(w).path.rsplit("/", 1)[-1] for w in words} - {""})
    tars = [n for n in names if n.endswith(".tar")]
    if len(tars) != 1:
        raise ShardIndexError(
            f"cannot tell which tar `{command}` reads ({len(tars)} *.tar names in it): the "
            "sizes file matches commands by the one tar file name each contains"
        )
    return tars[0]


def _counts_from_file(sizes_url: str, urls: list[str], names: list[str], opts: RemoteConfig) -> list[int]:
    table = _read_json(sizes_url, opts)
    counts = []
    for url, name in zip(urls, names):
        if name not in table:
            raise ShardIndexError(f"{sizes_url} has no entry for {name} (of {url})")
        counts.append(_count(table[name], f"{sizes_url}[{name!r}]"))
    return counts


def _is_tar(path: str) -> bool:
    return urlsplit(path).path.endswith(".tar") if storage.location_kind(path) != "local" else path.endswith(".tar")


def _pattern(src: ShardSourceConfig, path: str, opts: RemoteConfig) -> tuple[list[str], list[int]]:
    urls = list(wds.shardlists.expand_urls(path))
    if storage.location_kind(path) == "local":
        missing = [u for u in urls if not storage.exists(u, opts)]
        if missing:
            raise ShardIndexError(f"{len(missing)} shard(s) of {path} do not exist, e.g. {missing[0]}"
                                  + (f"; build them with: {src.build}" if src.build else ""))
    elif storage.exists(urls[0], opts) is False:
        raise ShardIndexError(f"{urls[0]} (the first shard of {path}) does not exist")
    if src.sizes:
        return urls, _counts_from_file(src.sizes, urls, [storage.file_name(u) for u in urls], opts)
    return urls, _counts_for(urls, opts)


def _pipe(src: ShardSourceConfig, opts: RemoteConfig) -> tuple[list[str], list[int]]:
    urls = list(wds.shardlists.expand_urls(src.path))
    if not src.sizes:
        return urls, []  # unknown counts: only resampled training can use them (the loader checks)
    return urls, _counts_from_file(src.sizes, urls, [pipe_shard_name(u) for u in urls], opts)


def _folder(src: ShardSourceConfig, path: str, opts: RemoteConfig) -> tuple[list[str], list[int]]:
    split = storage.join(path, src.split)
    absent = []
    for folder in (split, path):
        sizes_url = storage.join(folder, "sizes.json")
        try:
            sizes = _read_json(sizes_url, opts)
        except (NotFound, Denied) as e:  # S3-style servers answer 403 for a missing key
            absent.append(str(e))
            continue
        return _from_sizes_json(folder, sizes_url, sizes, opts)
    folder = split if storage.is_dir(split) else path
    tars = storage.list_tars(folder)
    if tars is None:
        raise ShardIndexError(
            f"no sizes.json for {path}: {'; '.join(absent)}. An http(s) folder cannot be listed: "
            "put a sizes.json there (`python -m shards` writes one) or give a brace pattern of tar URLs"
        )
    if not tars:
        raise ShardIndexError(f"no sizes.json and no *.tar shards in {folder}")
    return tars, _counts_for(tars, opts)


def _missing_folder(src: ShardSourceConfig) -> str:
    """One line: what is missing (relative paths are the current directory's) and how to build it."""
    where = "" if Path(src.path).is_absolute() else f" (relative to the current directory {Path.cwd()})"
    how = src.build or f"python -m shards build --source ... --output {src.path}"
    return f"training shards {src.path} not found{where}; build them first: {how}"


def discover_source(src: ShardSourceConfig, remote: RemoteConfig | None = None) -> ShardSet:
    """Resolve one ``data.shards`` entry into its shard list and counts.

    Args:
        src: the entry.
        remote: timeouts and retries for URLs (defaults when None).

    Raises:
        ShardIndexError: Nothing found, a listed tar is missing, or counts are unknown.
        StorageError: A location cannot be read (unreachable host, missing fsspec backend, ...).
    """
    opts = remote or RemoteConfig()
    path = src.path
    if not path:
        raise ShardIndexError("data.shards entry has an empty path")
    kind = storage.location_kind(path)
    if src.sizes and kind != "pipe" and not ("{" in path or _is_tar(path)):
        raise ShardIndexError(f"data.shards[].sizes is for brace patterns, .tar URLs and pipe: commands; "
                              f"the folder {path} is read through its own sizes.json")
    if kind == "pipe":
        urls, counts = _pipe(src, opts)
    elif "{" in path or _is_tar(path):
        urls, counts = _pattern(src, storage.local_path(path) if kind == "local" else path, opts)
    else:
        if kind == "local" and not Path(storage.local_path(path)).exists():
            raise ShardIndexError(_missing_folder(src))
        urls, counts = _folder(src, storage.local_path(path) if kind == "local" else path, opts)
    if counts and sum(counts) <= 0:
        raise ShardIndexError(f"source {path} holds no samples")
    return ShardSet(name=path, urls=tuple(urls), sizes=tuple(counts), weight=float(src.weight))
