"""``query --grid``: a contact sheet of the results with rank, score and caption, under a title."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from search.errors import SearchError
from search.query import Hit
from search.store import SearchIndex
from shards.grid import contact_sheet

TITLE_H = 22
TILE = 170


def _placeholder(text: str = "image unavailable") -> bytes:
    # a result whose shard moved away still gets a cell (with its score), not a crash
    im = Image.new("RGB", (160, 160), (200, 200, 200))
    ImageDraw.Draw(im).text((10, 70), text, fill="black", font=ImageFont.load_default())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _fit(data: bytes, side: int) -> bytes:
    # small shard images (e.g. 112 px) are enlarged to the cell, which the contact sheet does not do
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        scale = side / max(im.size)
        out = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC) if scale > 1 else im
        buf = io.BytesIO()
        out.save(buf, "PNG")
    return buf.getvalue()


def write_grid(index: SearchIndex, hits: list[Hit], path: str | Path, title: str, columns: int = 5) -> Path:
    """Write the contact sheet PNG of ``hits``; returns its path."""
    if not hits:
        raise SearchError("no results to draw in --grid")
    cells = []
    for h in hits:
        try:
            data = _fit(index.image_bytes(h.row), TILE - 4)
        except (SearchError, OSError):
            data = _placeholder()
        cells.append((data, f"{h.key}: {h.caption}", f"#{h.rank} {h.score:.3f}"))
    path = Path(path)
    try:
        contact_sheet(cells, path, tile=TILE, columns=columns, lines=3)
    except OSError as e:
        raise SearchError(f"cannot write --grid {path}: {e.strerror or e}") from None
    with Image.open(path) as sheet:
        titled = Image.new("RGB", (sheet.width, sheet.height + TITLE_H), "white")
        titled.paste(sheet, (0, TITLE_H))
    ImageDraw.Draw(titled).text((4, 5), title[:160], fill="black", font=ImageFont.load_default())
    titled.save(path)
    return path
