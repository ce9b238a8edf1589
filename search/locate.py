"""``search locate``: cut a large scene into tiles, score every tile against a phrase, say where.

Outputs in ``--out``: ``tiles.json`` (every tile: rank, pixel window, score, and the map
polygon when georeferenced), ``top/`` (the best tiles as PNG), ``heatmap.png`` and, for a
georeferenced scene, ``top_tiles.geojson``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from search.embed import Encoder
from search.errors import SearchError
from search.geo import tile_polygon, write_geojson
from search.heatmap import write_heatmap
from search.model import load, pick_device
from search.options import LocateOptions
from search.scene import Scene, read_scene, tile_grid


@dataclass
class LocateResult:
    """What ``locate`` found and wrote."""

    scene: Scene
    tiles: list[dict[str, Any]]
    """Every tile, best first."""
    files: dict[str, str] = field(default_factory=dict)


def score_tiles(encoder: Encoder, scene: Scene, grid: list[tuple[int, int]], tile: int, text: str,
                progress: bool = True) -> np.ndarray:
    """Cosine similarity of every tile of ``grid`` to ``text`` (tiles are embedded in batches)."""
    query = encoder.texts([text])[0]
    scores = np.empty(len(grid), np.float32)
    with tqdm(total=len(grid), desc="scoring tiles", unit="tile", disable=not progress or None) as bar:
        for start in range(0, len(grid), encoder.batch_size):
            part = grid[start:start + encoder.batch_size]
            crops = [scene.image.crop((x, y, x + tile, y + tile)) for x, y in part]
            scores[start:start + len(part)] = encoder.images(crops) @ query
            bar.update(len(part))
    return scores


def rank_tiles(scene: Scene, grid: list[tuple[int, int]], tile: int, scores: np.ndarray) -> list[dict[str, Any]]:
    """Tile records sorted best first (ties: the earlier tile in reading order)."""
    order = np.argsort(-scores, kind="stable")
    ranked = []
    for rank, i in enumerate(order.tolist(), start=1):
        x, y = grid[i]
        t: dict[str, Any] = {"rank": rank, "x": x, "y": y, "w": tile, "h": tile, "score": round(float(scores[i]), 5)}
        if scene.georef is not None:
            t["polygon"] = tile_polygon(scene.georef, x, y, tile, tile)
        ranked.append(t)
    return ranked


def _write(opts: LocateOptions, scene: Scene, grid: list[tuple[int, int]], scores: np.ndarray,
           ranked: list[dict[str, Any]], identity: dict[str, Any]) -> dict[str, str]:
    out = Path(opts.out)
    top_dir = out / "top"
    try:
        top_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SearchError(f"cannot create --out {out}: {e.strerror or e}") from None
    for old in top_dir.glob("rank*.png"):
        old.unlink()  # a re-run with fewer --top must not leave stale tiles behind
    for t in ranked[:opts.top]:
        crop = scene.image.crop((t["x"], t["y"], t["x"] + t["w"], t["y"] + t["h"]))
        crop.save(top_dir / f"rank{t['rank']:02d}_x{t['x']}_y{t['y']}.png")
    files = {"top": str(top_dir)}
    payload = {"scene": str(scene.path), "text": opts.text, "model": identity, "width": scene.size[0],
               "height": scene.size[1], "tile": opts.tile, "stride": opts.stride,
               "crs": scene.georef.crs if scene.georef else None,
               "transform": list(scene.georef.transform) if scene.georef else None, "tiles": ranked}
    (out / "tiles.json").write_text(json.dumps(payload, indent=1))
    files["tiles"] = str(out / "tiles.json")
    files["heatmap"] = str(write_heatmap(out / "heatmap.png", scene.image, grid, opts.tile, scores, ranked,
                                         opts.text))
    if scene.georef is not None:
        files["geojson"] = str(write_geojson(out / "top_tiles.geojson", scene.georef, ranked[:opts.top], opts.text))
    return files


def locate(opts: LocateOptions) -> LocateResult:
    """Run ``locate`` end to end.

    Raises:
        SearchError: bad options, an unreadable scene, a scene smaller than one tile, a bad model.
    """
    opts.validate()
    scene = read_scene(opts.image, opts.bands)
    grid = tile_grid(*scene.size, opts.tile, opts.stride, what=f"scene {scene.path.name}")
    device = pick_device(opts.device)
    bundle, identity = load(opts.model, device)
    encoder = Encoder(bundle, device, opts.batch_size)
    scores = score_tiles(encoder, scene, grid, opts.tile, opts.text, opts.progress)
    ranked = rank_tiles(scene, grid, opts.tile, scores)
    files = _write(opts, scene, grid, scores, ranked, identity.to_dict())
    return LocateResult(scene, ranked, files)


def format_top(result: LocateResult, top: int) -> str:
    """Table of the best tiles: rank, score, pixel window, and map centre when georeferenced."""
    geo = result.scene.georef
    head = f"{'#':>3}  {'score':>7}  {'x':>6}  {'y':>6}  {'size':>5}" + ("  centre (map x, y)" if geo else "")
    lines = [head]
    for t in result.tiles[:top]:
        line = f"{t['rank']:>3}  {t['score']:>7.4f}  {t['x']:>6}  {t['y']:>6}  {t['w']:>5}"
        if geo:
            cx, cy = geo.to_map(t["x"] + t["w"] / 2, t["y"] + t["h"] / 2)
            line += f"  {cx:.2f}, {cy:.2f}"
        lines.append(line)
    return "\n".join(lines)
