"""A large image to search in, and the tiles it is cut into."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from search.errors import SearchError
from search.geo import GeoRef, read_raster

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
"""Read through rasterio (GDAL): they may carry a georeference; PIL reads the rest."""


@dataclass
class Scene:
    """An RGB scene and, if the file had one, its georeference."""

    path: Path
    image: Image.Image
    georef: GeoRef | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def read_scene(path: str | Path, bands: list[int] | None = None) -> Scene:
    """Open a JPEG/PNG/TIFF/GeoTIFF scene as RGB.

    Raises:
        SearchError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise SearchError(f"scene not found: {p}" if not p.exists() else f"scene {p} is not a file")
    if p.suffix.lower() in RASTER_SUFFIXES:
        pixels, georef = read_raster(p, bands)
        return Scene(p, Image.fromarray(pixels, "RGB"), georef)
    if bands is not None:
        raise SearchError(f"--bands is for multi-band rasters (GeoTIFF); {p.name} is read as RGB")
    try:
        with Image.open(p) as im:
            return Scene(p, im.convert("RGB"))
    except Image.DecompressionBombError:
        raise SearchError(f"{p} is too large for PIL; convert it to a (Geo)TIFF, which is read through rasterio") \
            from None
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot read scene {p}: {type(e).__name__}: {e}") from None


def origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride``, plus one flush with the far edge."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # the far edge would otherwise never be scored
    return starts


def tile_grid(width: int, height: int, tile: int, stride: int, what: str = "scene") -> list[tuple[int, int]]:
    """Top-left corners ``(x, y)`` of every tile, row by row.

    Raises:
        SearchError: the scene is smaller than one tile.
    """
    if width < tile or height < tile:
        raise SearchError(f"{what} is {width}x{height} px, smaller than one {tile} px tile; "
                          f"use --tile {min(width, height)} or less")
    return [(x, y) for y in origins(height, tile, stride) for x in origins(width, tile, stride)]


def coverage_mean(width: int, height: int, tiles: list[tuple[int, int]], tile: int, scores: np.ndarray,
                  scale: float) -> np.ndarray:
    """Per-pixel mean score of the tiles covering each pixel, on a grid ``scale`` times smaller."""
    h, w = max(1, round(height / scale)), max(1, round(width / scale))
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for (x, y), s in zip(tiles, scores):
        r0, r1 = int(y / scale), max(int(y / scale) + 1, round((y + tile) / scale))
        c0, c1 = int(x / scale), max(int(x / scale) + 1, round((x + tile) / scale))
        total[r0:r1, c0:c1] += s
        count[r0:r1, c0:c1] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
