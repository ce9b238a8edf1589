"""The shards of a collection: which tar files, in which order, and the samples inside.

A ``--shards DIR`` is either a ``python -m shards build`` output (``DIR/<split>/*.tar``) or a
folder of tar files itself (any webdataset, ``sizes.json`` optional). The global order of
shards is the order of the folders given, then split, then file name: the assembled index
has this order whatever the number of processes that embedded it.

Tars are read with :mod:`tarfile` rather than webdataset's streaming reader because the
index keeps each image's byte offset inside its tar: the contact sheet and the web page
then fetch any result image with one seek instead of scanning a shard.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from search.errors import SearchError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff")


@dataclass(frozen=True)
class Shard:
    """One tar file of the collection."""

    index: int
    """Position in the global shard order."""
    path: str
    source: str
    """Name of the ``--shards`` folder it came from (unique within one index)."""
    split: str
    expected: int | None
    """Sample count from ``sizes.json``, if the folder has one."""


@dataclass
class Sample:
    """One sample of a shard, with where its image bytes lie."""

    key: str
    uid: str
    """``source:split/key``: unique across the whole index."""
    captions: list[str]
    label: int | None
    classname: str | None
    shard: str
    split: str
    image_offset: int
    image_size: int
    image: bytes = field(repr=False, default=b"")


def _source_names(folders: list[str]) -> list[str]:
    # Two inputs may share a base name (a/val, b/val): number them so uids stay unique.
    names: list[str] = []
    for folder in folders:
        base = Path(folder).resolve().name or "shards"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _tar_folders(folder: Path, splits: list[str] | None) -> list[tuple[str, Path]]:
    if any(folder.glob("*.tar")):
        return [(folder.name, folder)]
    found = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.tar")))
    if splits:
        missing = [s for s in splits if not (folder / s).is_dir()]
        if missing:
            raise SearchError(f"{folder}: no split {', '.join(missing)} (splits there: "
                              f"{', '.join(p.name for p in found) or 'none'})")
        found = [folder / s for s in splits]
    return [(p.name, p) for p in found]


def list_shards(folders: list[str], splits: list[str] | None = None) -> list[Shard]:
    """Every tar file of the collection in global order.

    Raises:
        SearchError: a folder holds no tar files.
    """
    shards: list[Shard] = []
    for folder, source in zip(folders, _source_names(folders)):
        root = Path(folder)
        groups = _tar_folders(root, splits)
        if not groups:
            raise SearchError(f"no shards in {root}: expected *.tar files there or in its split folders "
                              f"(a `python -m shards build` output)")
        for split, tar_dir in groups:
            sizes_path = tar_dir / "sizes.json"
            sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
            for tar in sorted(tar_dir.glob("*.tar")):
                shards.append(Shard(len(shards), str(tar.resolve()), source, split, sizes.get(tar.name)))
    return shards


def _key_and_ext(name: str) -> tuple[str, str]:
    # webdataset's rule: the key is everything before the first dot of the base name
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _sample(shard: Shard, key: str, members: dict[str, tuple[tarfile.TarInfo, bytes | None]],
            skipped: list[tuple[str, str]]) -> Sample | None:
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        skipped.append((f"{shard.source}:{shard.split}/{key}", "sample without an image"))
        return None
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"][1] or b"{}")
        except ValueError:
            skipped.append((f"{shard.source}:{shard.split}/{key}", "unreadable json"))
            return None
    captions = [str(c) for c in meta.get("captions") or []]
    if not captions and "txt" in members:
        captions = [(members["txt"][1] or b"").decode("utf-8", errors="replace").strip()]
    info, data = members[image_ext]
    label = meta.get("label")
    return Sample(key=key, uid=f"{shard.source}:{shard.split}/{key}", captions=captions,
                  label=label if isinstance(label, int) and not isinstance(label, bool) else None,
                  classname=meta.get("classname"), shard=shard.path, split=shard.split,
                  image_offset=info.offset_data, image_size=info.size, image=data or b"")


def read_shard(shard: Shard, skipped: list[tuple[str, str]]) -> Iterator[Sample]:
    """The samples of one tar in file order; problems go to ``skipped`` as ``(uid, reason)``."""
    try:
        tar = tarfile.open(shard.path, "r:")
    except (tarfile.TarError, OSError) as e:
        skipped.append((shard.path, f"unreadable shard: {type(e).__name__}: {e}"))
        return
    current, members = None, {}
    with tar:
        try:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _key_and_ext(info.name)
                if key != current:
                    if current is not None:
                        sample = _sample(shard, current, members, skipped)
                        if sample:
                            yield sample
                    current, members = key, {}
                data = tar.extractfile(info).read() if ext in (*IMAGE_EXTS, "json", "txt") else None
                members[ext] = (info, data)
        except (tarfile.TarError, OSError, EOFError) as e:
            skipped.append((shard.path, f"truncated shard: ends after key {current} ({type(e).__name__})"))
            members = {}
        if current is not None and members:
            sample = _sample(shard, current, members, skipped)
            if sample:
                yield sample


def read_image_bytes(shard_path: str, offset: int, size: int) -> bytes:
    """The bytes of one image member, by its recorded position (one seek)."""
    with open(shard_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard_path} is shorter than the index expects (was it rebuilt?)")
    return data
