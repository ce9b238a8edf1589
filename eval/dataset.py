"""The in-memory evaluation set every evaluator reads."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Union

from PIL import Image

ImageItem = Union[bytes, Image.Image]
"""Encoded image bytes (from shards) or an already decoded PIL image (synthetic)."""


@dataclass
class EvalDataset:
    """One split of one benchmark, loaded.

    ``labels[i]`` indexes ``classnames`` (the benchmark's prompt names) or is None
    where the sample has no class (or a class outside the benchmark's list).
    """

    key: str
    """Identity for feature caching: same key = same images in the same order."""
    images: list[ImageItem]
    captions: list[list[str]]
    labels: list[int | None]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    sources: list[str] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    """Samples left out while loading, by reason (e.g. a class outside the list)."""

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.captions) != n or len(self.labels) != n:
            raise ValueError(f"{self.key}: images/captions/labels lengths differ")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> list[int]:
        """Indices of samples that have a class label."""
        return [i for i, y in enumerate(self.labels) if y is not None]


def open_image(item: ImageItem) -> Image.Image:
    """Decode an :data:`ImageItem` to an RGB PIL image."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(io.BytesIO(item)) as im:
        return im.convert("RGB")
