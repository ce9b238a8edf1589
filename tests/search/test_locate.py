"""search locate: tiling, scores, outputs, GeoTIFF in and GeoJSON out, on a mosaic of real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.embed import Encoder
from search.errors import SearchError
from search.geo import _to_uint8
from search.locate import locate
from search.model import load
from search.options import LocateOptions
from search.scene import origins, tile_grid
from tests.conftest import SHARED_DATA
from tests.search.util import MODEL


@pytest.fixture(scope="module")
def mosaic() -> np.ndarray:
    """A 300 x 200 px scene cut from six real UCM-captions images."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (see DESIGN.md); skipping")
    files = sorted((SHARED_DATA / "ucm_captions" / "images").glob("*.jpg"))[::300][:6]
    scene = np.zeros((200, 300, 3), np.uint8)
    for i, f in enumerate(files):
        r, c = divmod(i, 3)
        scene[r * 100:(r + 1) * 100, c * 100:(c + 1) * 100] = np.asarray(Image.open(f).convert("RGB").resize((100, 100)))
    return scene


@pytest.fixture(scope="module")
def geotiff(mosaic, tmp_path_factory) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000.0, 4650000.0, 0.5, 0.5)) as dst:
        dst.write(np.moveaxis(mosaic, -1, 0))
    return path


def test_tiles_cover_the_scene_to_its_far_edges():
    assert origins(300, 64, 32) == [0, 32, 64, 96, 128, 160, 192, 224, 236]
    assert origins(64, 64, 32) == [0]
    grid = tile_grid(300, 200, 64, 32)
    assert len(grid) == 9 * 6 and grid[0] == (0, 0) and grid[-1] == (236, 136)
    covered = np.zeros((200, 300), bool)
    for x, y in grid:
        covered[y:y + 64, x:x + 64] = True
    assert covered.all()
    with pytest.raises(SearchError, match=r"scene is 300x50 px, smaller than one 64 px tile; use --tile 50 or less"):
        tile_grid(300, 50, 64, 32)


def test_locate_geotiff_writes_ranked_tiles_heatmap_and_geojson(geotiff, tmp_path):
    opts = LocateOptions(model=MODEL, image=str(geotiff), text="a river next to a road", out=str(tmp_path / "out"),
                         tile=64, stride=32, top=4, device="cpu", progress=False)
    result = locate(opts)
    tiles = json.loads((tmp_path / "out" / "tiles.json").read_text())
    assert tiles["crs"] == "EPSG:32633" and tiles["width"] == 300 and len(tiles["tiles"]) == 54
    scores = [t["score"] for t in tiles["tiles"]]
    assert scores == sorted(scores, reverse=True) and [t["rank"] for t in tiles["tiles"]] == list(range(1, 55))
    # a tile's score is the cosine of that crop's embedding with the text's, recomputed here
    bundle, _ = load(MODEL, "cpu")
    enc = Encoder(bundle, "cpu")
    best = tiles["tiles"][0]
    crop = result.scene.image.crop((best["x"], best["y"], best["x"] + 64, best["y"] + 64))
    assert best["score"] == pytest.approx(float(enc.images([crop])[0] @ enc.texts([opts.text])[0]), abs=1e-4)
    top = sorted(p.name for p in (tmp_path / "out" / "top").glob("*.png"))
    assert len(top) == 4 and top[0] == f"rank01_x{best['x']}_y{best['y']}.png"
    with Image.open(tmp_path / "out" / "heatmap.png") as im:
        assert im.width > 300 and im.height > 200
    geo = json.loads((tmp_path / "out" / "top_tiles.geojson").read_text())
    assert geo["crs"]["properties"]["name"] == "EPSG:32633" and len(geo["features"]) == 4
    ring = geo["features"][0]["geometry"]["coordinates"][0]
    x0, y0 = 500000.0 + 0.5 * best["x"], 4650000.0 - 0.5 * best["y"]  # north-up, 0.5 m pixels
    assert ring[0] == pytest.approx([x0, y0]) and ring[2] == pytest.approx([x0 + 32.0, y0 - 32.0])
    assert ring[0] == ring[-1] and geo["features"][0]["properties"]["rank"] == 1


def test_locate_plain_png_has_no_geojson_and_small_scene_is_refused(mosaic, tmp_path):
    png = tmp_path / "scene.png"
    Image.fromarray(mosaic).save(png)
    locate(LocateOptions(model=MODEL, image=str(png), text="houses", out=str(tmp_path / "o"), tile=100,
                         device="cpu", progress=False))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["heatmap.png", "tiles.json", "top"]
    with pytest.raises(SearchError, match=r"scene scene.png is 300x200 px, smaller than one 224 px tile"):
        locate(LocateOptions(model=MODEL, image=str(png), text="houses", out=str(tmp_path / "o2"), device="cpu"))


def test_sixteen_bit_multiband_rasters_are_stretched_and_bands_picked(tmp_path):
    import rasterio

    from search.scene import read_scene

    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (4, 80, 90)).astype(np.uint16)
    data[3] = 10_000  # a constant band: no range to stretch
    path = tmp_path / "s2.tif"
    with rasterio.open(path, "w", driver="GTiff", width=90, height=80, count=4, dtype="uint16") as dst:
        dst.write(data)
    scene = read_scene(path, bands=[3, 2, 1])
    assert scene.size == (90, 80) and scene.georef is None  # no CRS: plain raster
    px = np.asarray(scene.image)
    assert px[..., 0].max() == 255 and px[..., 0].min() == 0  # band 3 stretched to the full range
    assert (_to_uint8(data[[3, 3, 3]], None) == 0).all()
    with pytest.raises(SearchError, match=r"has 4 band\(s\); --bands 5,2,1 asks for more"):
        read_scene(path, bands=[5, 2, 1])
