"""Contact sheet of sample images with their (wrapped) captions."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(samples: list[tuple[bytes, str, str]], path: str | Path, tile: int = 160,
                  columns: int = 6, lines: int = 4) -> Path:
    """Write a PNG grid of ``(jpg bytes, caption, split)`` samples; return its path.

    Raises:
        ValueError: when there is nothing to draw.
    """
    if not samples:
        raise ValueError("no samples to draw")
    font = ImageFont.load_default()
    line_h = 12
    cols = min(columns, len(samples))
    rows = math.ceil(len(samples) / cols)
    cell_h = tile + lines * line_h + 8
    sheet = Image.new("RGB", (cols * tile, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, tile // 6)  # the default bitmap font is about 6 px per character
    for i, (jpg, caption, split) in enumerate(samples):
        x, y = (i % cols) * tile, (i // cols) * cell_h
        img = Image.open(io.BytesIO(jpg)).convert("RGB")
        img.thumbnail((tile - 4, tile - 4))
        sheet.paste(img, (x + (tile - img.width) // 2, y + 2))
        wrapped = textwrap.wrap(f"[{split}] {caption}", chars)[:lines]
        for k, text in enumerate(wrapped):
            draw.text((x + 3, y + tile + 2 + k * line_h), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
