"""Procedural aerial-looking scenes with captions: a dataset that needs no download.

Ten land-cover scene classes are drawn with numpy from a few materials (water,
forest, crops, sand, roads, roofs) in randomised layouts (position, orientation,
size, colour jitter, texture), so a tiny CLIP can learn them on CPU from 64x64
pixels. Captions vary in wording and mention secondary elements (a road, a
bridge, boats...), and always contain words that identify the class.

:func:`render_scene` is a pure function of ``(index, seed, size)``; the trainer's
in-memory synthetic source calls it on the fly, so it is kept vectorised and fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image

#: Class names, index = label; each reads well in "a satellite photo of {}.".
CLASSNAMES: list[str] = [
    "a lake in a forest", "farmland", "a dense residential area", "a river", "a harbor",
    "a highway interchange", "a desert", "a forest", "a beach", "an airport",
]
#: Zero-shot prompt templates for these scenes.
TEMPLATES: list[str] = ["a satellite photo of {}.", "an aerial image of {}.", "a remote sensing image of {}."]

# Caption phrasings per class; "{x}" is filled with a secondary-element phrase.
_PHRASES: list[list[str]] = [
    ["a lake surrounded by forest{x}.", "a blue lake in the middle of dense woods{x}.",
     "aerial view of a forest lake{x}.", "a small lake enclosed by trees{x}."],
    ["farmland with fields of different crops{x}.", "rectangular crop fields{x}.",
     "an agricultural area divided into fields{x}.", "aerial view of farmland{x}."],
    ["a dense residential area with many houses{x}.", "rows of houses along straight streets{x}.",
     "a crowded neighbourhood of small buildings{x}.", "aerial view of a dense residential area{x}."],
    ["a river winding through fields{x}.", "a meandering river crossing the countryside{x}.",
     "a river flowing between green fields{x}.", "aerial view of a curving river{x}."],
    ["a harbor with boats and piers{x}.", "a port with piers reaching into the water{x}.",
     "boats moored at a harbor{x}.", "aerial view of a harbor on the coast{x}."],
    ["a highway interchange with a loop ramp{x}.", "two highways crossing at an interchange{x}.",
     "a motorway junction with ramps{x}.", "aerial view of a highway interchange{x}."],
    ["a sandy desert with dunes{x}.", "rippled sand dunes in a desert{x}.",
     "a dry desert landscape{x}.", "aerial view of desert sand dunes{x}."],
    ["a dense forest{x}.", "a green forest canopy{x}.", "an area covered by trees{x}.",
     "aerial view of a forest{x}."],
    ["a sandy beach between the sea and the land{x}.", "a beach along the coastline{x}.",
     "waves reaching a sandy beach{x}.", "aerial view of a beach by the sea{x}."],
    ["an airport with a long runway{x}.", "a runway with a terminal building beside it{x}.",
     "an airfield with a paved runway{x}.", "aerial view of an airport{x}."],
]

_WATER = (0.10, 0.22, 0.36)
_FOREST = (0.10, 0.27, 0.11)
_GRASS = (0.40, 0.55, 0.24)
_CROPS = ((0.74, 0.67, 0.33), (0.48, 0.62, 0.22), (0.52, 0.40, 0.26), (0.30, 0.45, 0.18), (0.80, 0.74, 0.50))
_ROAD = (0.52, 0.52, 0.53)
_ROOFS = ((0.66, 0.26, 0.20), (0.82, 0.82, 0.80), (0.45, 0.45, 0.50), (0.60, 0.45, 0.35))
_SAND = (0.86, 0.77, 0.55)
_CONCRETE = (0.62, 0.62, 0.60)
_WHITE = (0.95, 0.95, 0.95)


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered scene."""

    image: Image.Image
    captions: list[str]
    label: int
    classname: str


@lru_cache(maxsize=8)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred coordinates in [-1, 1] and a bank of smooth noise textures (2S x 2S)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    rs = np.random.RandomState(1234)  # fixed: the bank is part of the function, not an input
    bank = []
    for cells in (4, 8, 16, 32, 64):
        low = rs.rand(cells, cells).astype(np.float32)
        img = Image.fromarray(low, "F").resize((2 * size, 2 * size), Image.Resampling.BICUBIC)
        field = np.asarray(img, dtype=np.float32)
        bank.append((field - field.mean()) / (field.std() + 1e-6))
    return yy, xx, np.stack(bank)


class _Canvas:
    """Float RGB canvas with the per-scene random state and helpers."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        self.size = size
        self.yy, self.xx, bank = _grids(size)
        oy, ox = rng.integers(0, size, 2)
        self.tex = bank[:, oy:oy + size, ox:ox + size]  # views: no copy
        self.img = np.zeros((size, size, 3), np.float32)

    def rotated(self, angle: float | None = None, cx: float = 0.0, cy: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (u along, v across) rotated by ``angle`` about ``(cx, cy)``."""
        a = self.rng.uniform(0, np.pi) if angle is None else angle
        x, y = self.xx - cx, self.yy - cy
        ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
        return ca * x + sa * y, ca * y - sa * x

    def colour(self, base: tuple[float, float, float], jitter: float = 0.06) -> np.ndarray:
        return np.clip(np.asarray(base, np.float32) + self.rng.uniform(-jitter, jitter, 3).astype(np.float32), 0, 1)

    def paint(self, mask: np.ndarray | None, base: tuple[float, float, float], texture: float = 0.05,
              scale: int = 3) -> None:
        """Fill ``mask`` (None: everywhere) with a jittered colour modulated by a noise texture."""
        col = self.colour(base)
        layer = col * (1 + texture * self.tex[scale])[..., None]
        if mask is None:
            self.img[:] = layer
        else:
            np.copyto(self.img, layer, where=mask[..., None])


def _road(c: _Canvas, width: float = 0.06, angle: float | None = None, offset: float | None = None) -> np.ndarray:
    u, v = c.rotated(angle)
    off = c.rng.uniform(-0.5, 0.5) if offset is None else offset
    mask = np.abs(v - off) < width
    c.paint(mask, _ROAD, 0.03, 4)
    return mask


def _lake(c: _Canvas) -> str:
    c.paint(None, _FOREST, 0.35, 2)
    u, v = c.rotated(cx=c.rng.uniform(-0.3, 0.3), cy=c.rng.uniform(-0.3, 0.3))
    a, b = c.rng.uniform(0.3, 0.6), c.rng.uniform(0.2, 0.4)
    wobble = 0.12 * c.tex[1]
    c.paint((u / a) ** 2 + (v / b) ** 2 + wobble < 1, _WATER, 0.05, 0)
    if c.rng.random() < 0.3:
        _road(c, 0.035, offset=c.rng.choice([-0.8, 0.8]))
        return " and a road along one side"
    return ""


def _farmland(c: _Canvas) -> str:
    u, v = c.rotated(angle=c.rng.choice([0.0, np.pi / 2]) + c.rng.uniform(-0.3, 0.3))
    n = c.rng.integers(3, 6)
    cuts = np.sort(c.rng.uniform(-1.2, 1.2, n - 1))
    band = np.searchsorted(cuts, u)
    rows = np.sin(v * c.rng.uniform(40, 70)) > 0
    crops = c.rng.permutation(len(_CROPS))
    for k in range(n):
        c.paint(band == k, _CROPS[crops[k % len(_CROPS)]], 0.08, 3)
    c.img *= np.where(rows, 1.0, 0.88).astype(np.float32)[..., None]
    if c.rng.random() < 0.5:
        _road(c, 0.045)
        return " with a road crossing it"
    return ""


def _residential(c: _Canvas) -> str:
    c.paint(None, _ROAD, 0.05, 4)
    u, v = c.rotated(angle=c.rng.uniform(-0.2, 0.2) + c.rng.choice([0.0, np.pi / 2]))
    pitch = c.rng.uniform(0.18, 0.26)
    fu, fv = np.mod(u, pitch) / pitch, np.mod(v, pitch) / pitch
    house = (fu > 0.2) & (fu < 0.8) & (fv > 0.2) & (fv < 0.8)
    cell = (np.floor(u / pitch) * 7 + np.floor(v / pitch) * 13).astype(np.int64) % len(_ROOFS)
    for k in range(len(_ROOFS)):
        c.paint(house & (cell == k), _ROOFS[k], 0.04, 4)
    if c.rng.random() < 0.4:
        c.paint((~house) & (c.tex[3] > 1.0), _FOREST, 0.2, 4)
        return " and some trees between them"
    return ""


def _river(c: _Canvas) -> str:
    c.paint(None, _GRASS if c.rng.random() < 0.6 else _CROPS[0], 0.15, 2)
    u, v = c.rotated()
    amp, freq, phase = c.rng.uniform(0.15, 0.4), c.rng.uniform(2, 5), c.rng.uniform(0, 6.3)
    water = np.abs(v - amp * np.sin(freq * u + phase)) < c.rng.uniform(0.07, 0.13)
    c.paint(water, _WATER, 0.05, 0)
    if c.rng.random() < 0.4:
        _road(c, 0.03, angle=np.arctan2(1, 1) * 2 * c.rng.random())
        return " with a bridge over it"
    return ""


def _harbor(c: _Canvas) -> str:
    u, v = c.rotated()
    shore = c.rng.uniform(-0.3, 0.3)
    c.paint(None, _WATER, 0.05, 0)
    c.paint(v < shore, _CONCRETE, 0.06, 4)
    pitch = c.rng.uniform(0.25, 0.4)
    pier = (np.mod(u, pitch) < 0.06) & (v >= shore) & (v < shore + c.rng.uniform(0.35, 0.6))
    c.paint(pier, _CONCRETE, 0.03, 4)
    n_boats = int(c.rng.integers(3, 9))
    bu, bv = c.rng.uniform(-0.9, 0.9, n_boats), c.rng.uniform(shore + 0.1, 1.0, n_boats)
    for k in range(n_boats):
        c.paint((np.abs(u - bu[k]) < 0.05) & (np.abs(v - bv[k]) < 0.025), _WHITE, 0.0)
    return "" if n_boats < 6 else ", many boats in the water"


def _interchange(c: _Canvas) -> str:
    c.paint(None, _GRASS, 0.15, 2)
    cx, cy = c.rng.uniform(-0.25, 0.25, 2)
    u, v = c.rotated(cx=cx, cy=cy)
    r = np.sqrt(u * u + v * v)
    rad = c.rng.uniform(0.25, 0.4)
    ramps = (np.abs(r - rad) < 0.035) & (u > 0) & (v > 0)
    ramps |= (np.abs(r - rad) < 0.035) & (u < 0) & (v < 0)
    c.paint((np.abs(u) < 0.06) | (np.abs(v) < 0.06) | ramps, _ROAD, 0.03, 4)
    lane = ((np.abs(u) < 0.006) & (np.abs(v) > 0.07)) | ((np.abs(v) < 0.006) & (np.abs(u) > 0.07))
    c.paint(lane, _WHITE, 0.0)
    return ""


def _desert(c: _Canvas) -> str:
    c.paint(None, _SAND, 0.08, 1)
    u, v = c.rotated()
    ripples = np.sin(v * c.rng.uniform(12, 25) + 2.0 * c.tex[1])
    c.img *= (1 + 0.12 * ripples)[..., None]
    if c.rng.random() < 0.3:
        _road(c, 0.03)
        return " crossed by a straight road"
    return ""


def _forest(c: _Canvas) -> str:
    c.paint(None, _FOREST, 0.45, 3)
    c.img *= (1 + 0.15 * c.tex[4])[..., None]
    if c.rng.random() < 0.4:
        u, v = c.rotated(cx=c.rng.uniform(-0.5, 0.5), cy=c.rng.uniform(-0.5, 0.5))
        c.paint(u * u / 0.06 + v * v / 0.03 < 1, _GRASS, 0.1, 3)
        return " with a small clearing"
    return ""


def _beach(c: _Canvas) -> str:
    u, v = c.rotated()
    shore = c.rng.uniform(-0.3, 0.2) + 0.06 * c.tex[1]
    width = c.rng.uniform(0.2, 0.4)
    built = c.rng.random() < 0.4
    c.paint(None, _CONCRETE if built else _GRASS, 0.2, 3)
    c.paint(v < shore + width, _SAND, 0.05, 2)
    c.paint(v < shore, _WATER, 0.05, 0)
    c.paint((v < shore) & (v > shore - 0.04), _WHITE, 0.05, 4)  # surf line
    return ", with buildings behind it" if built else ""


def _airport(c: _Canvas) -> str:
    c.paint(None, _GRASS, 0.12, 2)
    u, v = c.rotated()
    off = c.rng.uniform(-0.3, 0.3)
    c.paint((np.abs(v - off) < 0.09) & (np.abs(u) < 0.95), (0.32, 0.32, 0.34), 0.02, 4)
    c.paint((np.abs(v - off) < 0.01) & (np.mod(u, 0.2) < 0.1) & (np.abs(u) < 0.85), _WHITE, 0.0)
    side = 1 if c.rng.random() < 0.5 else -1
    c.paint((np.abs(v - off - side * 0.4) < 0.12) & (np.abs(u) < 0.4), _CONCRETE, 0.05, 4)
    if c.rng.random() < 0.5:
        c.paint((np.abs(v - off - side * 0.22) < 0.03) & (np.abs(u) < 0.8), _ROAD, 0.02, 4)
        return " and a taxiway"
    return ""


_PAINTERS: list[Callable[[_Canvas], str]] = [
    _lake, _farmland, _residential, _river, _harbor, _interchange, _desert, _forest, _beach, _airport,
]


def render_scene(index: int, seed: int = 0, size: int = 64) -> SyntheticSample:
    """Render scene ``index`` (label ``index % len(CLASSNAMES)``); pure in its arguments.

    Args:
        index: Non-negative sample index.
        seed: Dataset seed (different seeds give different scenes for one index).
        size: Image side in pixels.

    Returns:
        The image (RGB), three captions, the integer label and the class name.
    """
    if index < 0 or seed < 0 or size < 8:
        raise ValueError(f"render_scene needs index >= 0, seed >= 0, size >= 8; got {index}, {seed}, {size}")
    label = index % len(CLASSNAMES)
    rng = np.random.default_rng((seed, index))
    canvas = _Canvas(rng, size)
    extra = _PAINTERS[label](canvas)
    # Global illumination/haze jitter, then pixel grain.
    img = canvas.img * np.float32(rng.uniform(0.85, 1.15)) + np.float32(rng.uniform(-0.03, 0.05))
    img += 0.02 * canvas.tex[4][..., None]
    pixels = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    phrases = _PHRASES[label]
    picks = rng.permutation(len(phrases))[:3]
    captions = [phrases[k].replace("{x}", extra) for k in picks]
    return SyntheticSample(Image.fromarray(pixels, "RGB"), captions, label, CLASSNAMES[label])
