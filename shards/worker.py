"""Per-item work done in the worker processes: read, convert, encode."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image

from shards.imaging import encode_image, encode_jpeg, pixel_digest
from shards.items import Item, SkipError


@dataclass(frozen=True)
class ImageOptions:
    """Options that change the stored bytes."""

    resize: int | None = None
    jpeg_quality: int = 95
    synthetic_seed: int = 0
    synthetic_size: int = 64


@dataclass(frozen=True)
class Result:
    """Outcome for one item: either ``members`` to write or a skip reason."""

    item: Item
    members: dict[str, bytes] | None = None
    digest: str = ""
    reason: str = ""
    detail: str = ""


def sample_json(item: Item, width: int, height: int) -> dict[str, Any]:
    """The ``KEY.json`` record (DESIGN.md shard format, plus image size)."""
    record: dict[str, Any] = dict(item.extra)
    record.update(
        key=item.key, captions=list(item.captions), label=item.label,
        classname=item.classname, source=item.source, split=item.split,
        width=width, height=height,
    )
    return record


def _synthetic(item: Item, opts: ImageOptions) -> Result:
    from shards.synthetic import render_scene

    assert item.synthetic_index is not None
    scene = render_scene(item.synthetic_index, seed=opts.synthetic_seed, size=opts.synthetic_size)
    item = dataclasses.replace(item, captions=tuple(scene.captions), label=scene.label, classname=scene.classname)
    img = scene.image
    if opts.resize is not None and min(img.size) != opts.resize:
        img = img.resize((opts.resize, opts.resize), Image.Resampling.BICUBIC)
    return _result(item, encode_jpeg(img, opts.jpeg_quality), pixel_digest(scene.image), img.size)


def _result(item: Item, jpeg: bytes, digest: str, size: tuple[int, int]) -> Result:
    record = json.dumps(sample_json(item, size[0], size[1]), ensure_ascii=False, sort_keys=True)
    members = {"jpg": jpeg, "txt": item.captions[0].encode("utf-8"), "json": record.encode("utf-8")}
    return Result(item, members=members, digest=digest)


def _image(item: Item, opts: ImageOptions) -> tuple[bytes, str, int, int]:
    assert item.path is not None
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SkipError("missing-file", "file does not exist") from None
    except IsADirectoryError:
        raise SkipError("unreadable-file", "is a directory") from None
    except OSError as e:
        raise SkipError("unreadable-file", f"{type(e).__name__}: {e.strerror or e}") from None
    enc = encode_image(data, opts.resize, opts.jpeg_quality)
    return enc.jpeg, enc.digest, enc.width, enc.height


def process_item(item: Item, opts: ImageOptions) -> Result:
    """Turn one item into tar members, or a skip with its reason; never raises for bad input."""
    if item.pre_skip is not None:
        return Result(item, reason=item.pre_skip[0], detail=item.pre_skip[1])
    if item.synthetic_index is not None:
        return _synthetic(item, opts)
    if not item.captions:
        dropped = item.dropped_captions
        # Undecodable text is its own reason, so a bad encoding is not mistaken for missing data.
        if dropped and all(r == "non-utf8" for r in dropped):
            return Result(item, reason="non-utf8", detail="every caption row is not UTF-8")
        detail = "dropped: " + ", ".join(sorted(set(dropped))) if dropped else "no captions given"
        return Result(item, reason="no-caption", detail=detail)
    try:
        jpeg, digest, w, h = _image(item, opts)
    except SkipError as e:
        return Result(item, reason=e.reason, detail=e.detail)
    return _result(item, jpeg, digest, (w, h))


class ItemProcessor:
    """Picklable callable for ``Pool.imap`` (binds the options)."""

    def __init__(self, opts: ImageOptions) -> None:
        self.opts = opts

    def __call__(self, item: Item) -> Result:
        return process_item(item, self.opts)
