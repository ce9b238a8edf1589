"""Georeferenced rasters in (through rasterio), tile polygons out (GeoJSON in the raster's CRS).

Real scenes are often 16-bit or have more than three bands: three bands are picked (1, 2, 3
unless told) and anything that is not 8-bit is stretched per band between its 2nd and 98th
percentile, the usual display stretch, so the model sees an image like the ones it saw in
training.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.errors import SearchError


@dataclass
class GeoRef:
    """Where pixel (col, row) lies: ``transform * (col, row)`` in ``crs``."""

    crs: str
    transform: tuple[float, float, float, float, float, float]
    """Affine coefficients a, b, c, d, e, f (rasterio's order): x = a*col + b*row + c, y = d*col + e*row + f."""

    def to_map(self, col: float, row: float) -> tuple[float, float]:
        a, b, c, d, e, f = self.transform
        return a * col + b * row + c, d * col + e * row + f


def _to_uint8(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """uint8[H, W, 3] from bands-first data of any dtype (2-98 % stretch unless already 8-bit)."""
    if data.dtype == np.uint8:
        return np.ascontiguousarray(np.moveaxis(data, 0, -1))
    out = np.zeros(data.shape[1:] + (data.shape[0],), np.uint8)
    for i, band in enumerate(data.astype(np.float64)):
        valid = np.isfinite(band) & ((band != nodata) if nodata is not None else True)
        if not valid.any():
            continue
        lo, hi = np.percentile(band[valid], [2, 98])
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out[..., i] = np.clip((band - lo) * scale, 0, 255).astype(np.uint8)
    return out


def read_raster(path: Path, bands: list[int] | None) -> tuple[np.ndarray, GeoRef | None]:
    """RGB uint8 pixels and the georeference (None when the file has none) of a GDAL raster.

    Raises:
        SearchError: unreadable file, or bands the file does not have.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain TIFFs are fine: no GeoJSON then
            with rasterio.open(path) as src:
                count = src.count
                wanted = bands or ([1, 2, 3] if count >= 3 else [1, 1, 1])
                if max(wanted) > count:
                    raise SearchError(f"{path} has {count} band(s); --bands {','.join(map(str, wanted))} asks for more")
                data = src.read(wanted)
                georef = None
                if src.crs is not None and not src.transform.is_identity:
                    t = src.transform
                    georef = GeoRef(src.crs.to_string(), (t.a, t.b, t.c, t.d, t.e, t.f))
                return _to_uint8(data, src.nodata), georef
    except RasterioIOError as e:
        raise SearchError(f"cannot read scene {path}: {str(e).splitlines()[0]}") from None


def tile_polygon(georef: GeoRef, x: int, y: int, w: int, h: int) -> list[list[float]]:
    """Closed ring of a pixel window's four corners in map coordinates."""
    corners = [(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)]
    return [list(georef.to_map(c, r)) for c, r in corners]


def write_geojson(path: Path, georef: GeoRef, tiles: list[dict[str, Any]], text: str) -> Path:
    """The ranked tiles as GeoJSON polygons in the raster's own CRS (named in ``crs``).

    RFC 7946 assumes WGS 84; a projected scene's tiles are kept in its CRS (what a GIS lays
    over the scene without reprojection) and the CRS is named in the 2008-style ``crs`` member,
    which QGIS and GDAL read.
    """
    features = [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [tile_polygon(georef, t["x"], t["y"], t["w"], t["h"])]},
        "properties": {"rank": t["rank"], "score": t["score"], "text": text,
                       "pixel_window": [t["x"], t["y"], t["w"], t["h"]]},
    } for t in tiles]
    payload = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": georef.crs}},
               "features": features}
    path.write_text(json.dumps(payload, indent=1))
    return path
