"""Helpers for the shards tests (no tests here): tiny images in every format the builder must handle."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def rgb_image(seed: int, size: int = 32) -> Image.Image:
    """A random RGB image, different per seed."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    """Encode ``img`` in ``fmt``."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    """Write bytes, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def four_band_tiff(seed: int) -> bytes:
    """A 4-band TIFF whose 4th band is 'unspecified' (RGB + NIR style), as GIS tools write it.

    Pillow always writes an alpha ExtraSamples value, so the tag value is patched to 0.
    """
    rgba = Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA")
    data = image_bytes(rgba, "TIFF")
    tag = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # ExtraSamples=2 (unassociated alpha), little endian
    assert data.count(tag) == 1
    return data.replace(tag, tag[:8] + b"\x00\x00")


def read_split(out: Path, split: str) -> list[dict]:
    """All samples of a split through a real ``webdataset.WebDataset`` reader."""
    tars = sorted(str(p) for p in (out / split).glob("*.tar"))
    ds = wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil")
    samples = []
    for s in ds:
        samples.append({"key": s["__key__"], "image": s["jpg"], "txt": s["txt"], "json": s["json"]})
    return samples


def stats(out: Path, split: str) -> dict:
    """The split's stats.json."""
    return json.loads((out / split / "stats.json").read_text())


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (for byte-identity checks)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
