"""Text -> image and image -> image queries against an opened index.

The model is loaded only for queries that need embedding (``--key`` needs none) and is
checked against the index's recorded identity before the first query is answered.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from search.embed import Encoder, decode_image
from search.errors import SearchError
from search.model import ModelIdentity, check_same_model, load, pick_device
from search.store import SearchIndex


@dataclass
class Hit:
    """One result row."""

    rank: int
    score: float
    key: str
    uid: str
    caption: str
    captions: list[str]
    label: int | None
    classname: str | None
    split: str
    row: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_query_image(path: str | Path) -> Image.Image:
    """The RGB image of a query file.

    Raises:
        SearchError: missing, a folder, or not an image.
    """
    p = Path(path)
    if not p.exists():
        raise SearchError(f"query image not found: {p}")
    if not p.is_file():
        raise SearchError(f"query image {p} is not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SearchError(f"cannot read query image {p}: {e.strerror or e}") from None
    if not data:
        raise SearchError(f"query image {p} is empty (0 bytes)")
    return decode_image(data, f"query image {p}")


class Searcher:
    """Answers queries on one index with the index's own model.

    Args:
        index: the opened index.
        model: model spec to embed queries with (default: the one recorded in the index).
        device: ``auto``, ``cpu``, ``cuda`` ...
    """

    def __init__(self, index: SearchIndex, model: str | None = None, device: str = "auto") -> None:
        self.index = index
        self.model_spec = model
        self.device = device
        self.recorded = ModelIdentity.from_dict(index.meta["model"])
        self._encoder: Encoder | None = None
        self._lock = threading.Lock()  # the web server answers from several threads

    @property
    def encoder(self) -> Encoder:
        """The query encoder, loaded and identity-checked on first use."""
        if self._encoder is None:
            spec = self.model_spec or self.recorded.spec_resolved
            bundle, identity = load(spec, pick_device(self.device))
            check_same_model(self.recorded, identity, str(self.index.path))
            self._encoder = Encoder(bundle, pick_device(self.device), batch_size=64)
        return self._encoder

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        hits = []
        for score, row in zip(scores.tolist(), rows.tolist()):
            if row < 0:  # faiss pads with -1 when fewer than k were found
                continue
            it = self.index.items[row]
            caps = it.get("captions") or []
            hits.append(Hit(len(hits) + 1, round(float(score), 4), it["key"], it["uid"], caps[0] if caps else "",
                            caps, it.get("label"), it.get("classname"), it.get("split", ""), row))
        return hits

    def by_vector(self, vector: np.ndarray, k: int) -> list[Hit]:
        """Nearest items of one unit vector."""
        scores, rows = self.index.search(vector.reshape(1, -1), k)
        return self._hits(scores[0], rows[0])

    def by_text(self, text: str, k: int) -> list[Hit]:
        """Text -> image."""
        if not text or not text.strip():
            raise SearchError("empty query: type some words, e.g. \"baseball field\"")
        with self._lock:
            vec = self.encoder.texts([text.strip()])
        return self.by_vector(vec[0], k)

    def by_image(self, image: Image.Image, k: int) -> list[Hit]:
        """Image -> image for a decoded image."""
        with self._lock:
            vec = self.encoder.images([image.convert("RGB")])
        return self.by_vector(vec[0], k)

    def by_image_file(self, path: str | Path, k: int) -> list[Hit]:
        """Image -> image for an image file."""
        return self.by_image(read_query_image(path), k)

    def by_key(self, key: str, k: int) -> list[Hit]:
        """Image -> image from an indexed item (its stored vector; it comes back first)."""
        if not key or not key.strip():
            raise SearchError("empty query: give an item key from the index")
        row = self.index.row_of(key.strip())
        return self.by_vector(np.asarray(self.index.vectors[row], dtype=np.float32), k)


def format_table(hits: list[Hit], width: int = 72) -> str:
    """Ranked plain-text table: rank, score, key, class, caption."""
    if not hits:
        return "(no results)"
    show_uid = len({h.key for h in hits}) < len(hits)  # same key from two folders: show where
    keys = [h.uid if show_uid else h.key for h in hits]
    classes = [h.classname or ("" if h.label is None else str(h.label)) for h in hits]
    kw, cw = max(3, *map(len, keys)), max(5, *map(len, classes))
    lines = [f"{'#':>3}  {'score':>6}  {'key':<{kw}}  {'class':<{cw}}  caption"]
    for h, key, cls in zip(hits, keys, classes):
        cap = h.caption if len(h.caption) <= width else h.caption[:width - 3] + "..."
        lines.append(f"{h.rank:>3}  {h.score:>6.3f}  {key:<{kw}}  {cls:<{cw}}  {cap}")
    return "\n".join(lines)
