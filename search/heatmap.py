"""The heat-map overlay of ``locate``: the scene, tile scores in colour, the best tiles boxed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from search.scene import coverage_mean

MAX_SIDE = 1024
"""Longest side of the drawn scene: a 10,000 px scene is shown downscaled."""


def write_heatmap(path: Path, image: Image.Image, tiles: list[tuple[int, int]], tile: int, scores: np.ndarray,
                  ranked: list[dict[str, Any]], text: str, boxes: int = 3) -> Path:
    """Write the overlay PNG; ``ranked`` are the best tiles (dicts with x, y, w, h, rank, score)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    width, height = image.size
    scale = max(1.0, max(width, height) / MAX_SIDE)
    shown = image.resize((max(1, round(width / scale)), max(1, round(height / scale))), Image.BILINEAR)
    heat = coverage_mean(width, height, tiles, tile, scores, scale)
    fig_w = 7.0
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * shown.height / shown.width + 0.6), dpi=130)
    ax.imshow(shown, extent=(0, width, height, 0))
    im = ax.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, width, height, 0),
                   vmin=float(np.min(scores)), vmax=float(np.max(scores)), interpolation="bilinear")
    for t in ranked[:boxes]:
        ax.add_patch(Rectangle((t["x"], t["y"]), t["w"], t["h"], fill=False, edgecolor="cyan", linewidth=1.8))
        ax.text(t["x"] + 4, t["y"] + 4, f"#{t['rank']} {t['score']:.3f}", color="cyan", va="top", fontsize=8,
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "edgecolor": "none"})
    ax.set_title(f'"{text}" — {len(tiles)} tiles of {tile} px', fontsize=10)
    ax.set_axis_off()
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label="cosine similarity to the text")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
