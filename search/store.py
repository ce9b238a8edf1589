"""The index folder: write it atomically, open it, look items up, search it.

Layout of ``INDEX/``:

- ``index.faiss`` — the faiss index (row i = item i);
- ``vectors.npy`` — the exact float32 unit embeddings (``--key`` queries, re-indexing, checks);
- ``items.jsonl`` — one line per row: uid, key, captions, label, classname, split, source,
  shard path and the image's byte offset/size inside the shard;
- ``meta.json`` — model identity, dimension, count, index kind and parameters, measured
  recall@10, build times, and inputs = indexed + skipped (with reasons).
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from search.ann import set_search_param
from search.collection import read_image_bytes
from search.errors import SearchError

FORMAT = "orbitclip-search/1"
FILES = ("index.faiss", "vectors.npy", "items.jsonl", "meta.json")


def write_index(out: str | Path, index: faiss.Index, vectors: np.ndarray, items: list[dict[str, Any]],
                meta: dict[str, Any], overwrite: bool = False) -> Path:
    """Write the folder next to ``out`` and rename it into place, so a crash leaves no half index."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    faiss.write_index(index, str(tmp / "index.faiss"))
    np.save(tmp / "vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32))
    with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=2, ensure_ascii=False))
    if out.exists():
        if not overwrite and any(out.iterdir()):
            shutil.rmtree(tmp)
            raise SearchError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class SearchIndex:
    """An opened index folder (see the module docstring for its files)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise SearchError(f"index not found: {self.path} (build one with `python -m search index`)")
        missing = [f for f in FILES if not (self.path / f).is_file()]
        if missing:
            raise SearchError(f"{self.path} is not a search index: {', '.join(missing)} missing")
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise SearchError(f"{self.path}: unknown index format {self.meta.get('format')!r} (expected {FORMAT})")
        with open(self.path / "items.jsonl", encoding="utf-8") as f:
            self.items: list[dict[str, Any]] = [json.loads(line) for line in f]
        self.vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
        self.index = faiss.read_index(str(self.path / "index.faiss"))
        tuned = self.meta["index"].get("search", {})
        set_search_param(self.index, self.meta["index"]["kind"], tuned.get("value"))
        if not (len(self.items) == self.index.ntotal == len(self.vectors) == self.meta["count"]):
            raise SearchError(f"{self.path} is inconsistent: {len(self.items)} items, {self.index.ntotal} "
                              f"indexed, {len(self.vectors)} vectors, meta says {self.meta['count']}; rebuild it")
        self._by_uid = {it["uid"]: i for i, it in enumerate(self.items)}
        self._by_key: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            self._by_key.setdefault(it["key"], []).append(i)

    def __len__(self) -> int:
        return len(self.items)

    def row_of(self, key: str) -> int:
        """Row of an item by its shard key (if unique) or its uid ``source:split/key``.

        Raises:
            SearchError: unknown or ambiguous key (with the closest keys or the candidates).
        """
        if key in self._by_uid:
            return self._by_uid[key]
        rows = self._by_key.get(key, [])
        if len(rows) == 1:
            return rows[0]
        if rows:
            raise SearchError(f"key {key!r} is in {len(rows)} places; give one of: "
                              + ", ".join(self.items[r]["uid"] for r in rows[:10]))
        near = difflib.get_close_matches(key, list(self._by_key)[:200_000], n=3)
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise SearchError(f"unknown key {key!r}: not in index {self.path} ({len(self)} items){hint}")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the top ``k`` per query; rows of -1 (none) are dropped by callers."""
        k = min(k, len(self))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def image_bytes(self, row: int) -> bytes:
        """The encoded image of a row, read from its shard."""
        it = self.items[row]
        try:
            return read_image_bytes(it["shard"], it["offset"], it["size"])
        except OSError as e:
            raise SearchError(f"image of {it['uid']} unreadable from {it['shard']}: {e}") from None
