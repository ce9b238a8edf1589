"""A large georeferenced test scene for ``search locate``, made from real held-out images.

    python -m benchmarks.search_scene --out runs/search/scene.tif [--target BaseballField]

``../shared/data`` has no large scene, so this lays 64 RSICD *val* images (never seen in
training) out as an 8 x 8 mosaic (1,792 px a side at 224 px each) with exactly one image of
the ``--target`` scene class, and writes it as a GeoTIFF with a made-up north-up UTM
georeference (EPSG:32633, 0.5 m pixels) plus a PNG preview. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("ORBITCLIP_DATA", ROOT.parent / "shared" / "data"))
SIDE, GRID = 224, 8
ORIGIN, PIXEL, CRS = (500000.0, 4650000.0), 0.5, "EPSG:32633"
LOOKALIKES = {"BaseballField": {"BaseballField", "Playground", "playfields", "Stadium"}}
"""Classes left out besides the target, so that only one tile truly shows the target."""


def make_scene(out: Path, target: str, seed: int) -> tuple[Path, tuple[int, int]]:
    """Write the mosaic GeoTIFF (and ``.png`` preview); returns its path and the target's (col, row)."""
    import rasterio
    from rasterio.transform import from_origin

    data = json.loads((DATA / "rsicd" / "dataset_rsicd.json").read_text(encoding="utf-8"))
    val = [im for im in data["images"] if im.get("split") == "val"]
    rng = random.Random(seed)
    avoid = LOOKALIKES.get(target, {target})
    others = rng.sample([im for im in val if im.get("label") not in avoid], GRID * GRID - 1)
    goal = rng.choice([im for im in val if im.get("label") == target])
    where = rng.randrange(GRID * GRID)
    tiles = others[:where] + [goal] + others[where:]
    mosaic = np.zeros((GRID * SIDE, GRID * SIDE, 3), np.uint8)
    for i, im in enumerate(tiles):
        r, c = divmod(i, GRID)
        pixels = Image.open(DATA / "rsicd" / "images" / im["filename"]).convert("RGB").resize((SIDE, SIDE))
        mosaic[r * SIDE:(r + 1) * SIDE, c * SIDE:(c + 1) * SIDE] = np.asarray(pixels)
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", driver="GTiff", width=mosaic.shape[1], height=mosaic.shape[0], count=3,
                       dtype="uint8", crs=CRS, transform=from_origin(*ORIGIN, PIXEL, PIXEL)) as dst:
        dst.write(np.moveaxis(mosaic, -1, 0))
    Image.fromarray(mosaic).save(out.with_suffix(".png"))
    return out, (where % GRID, where // GRID)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search_scene", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "search" / "scene.tif"))
    p.add_argument("--target", default="BaseballField", help="RSICD scene label placed once")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path, (col, row) = make_scene(Path(a.out), a.target, a.seed)
    x, y = col * SIDE, row * SIDE
    print(f"wrote {path} ({GRID * SIDE} px a side, {CRS}); the {a.target} image is at pixels "
          f"x {x}-{x + SIDE}, y {y}-{y + SIDE} (map x {ORIGIN[0] + x * PIXEL:.0f}, y {ORIGIN[1] - y * PIXEL:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
