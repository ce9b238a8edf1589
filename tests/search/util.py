"""Shared pieces of the search tests: small real shard collections, a built index, a rank worker.

The collections are subsets of ../shared/data (UCM-captions val images with their captions,
RSICD val images with their scene labels), built with ``shards.api.build`` into a few small
shards each, so a 2-process build has shards for both ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shards import api as shards_api
from tests.conftest import SHARED_DATA

MODEL = "orbit-tiny"  # random init (seed 0): deterministic, no weights to download


def _subset_json(src: Path, out: Path, count: int, split: str = "val") -> Path:
    data = json.loads(src.read_text(encoding="utf-8"))
    images = [im for im in data["images"] if im.get("split") == split][:count]
    out.write_text(json.dumps({**data, "images": images}), encoding="utf-8")
    return out


def build_collection(root: Path) -> list[Path]:
    """Two shard folders: 48 UCM-captions val images (3 tars) and 24 RSICD val images (2 tars, labelled)."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (see DESIGN.md); skipping")
    root.mkdir(parents=True, exist_ok=True)
    ucm = _subset_json(SHARED_DATA / "ucm_captions" / "dataset.json", root / "ucm.json", 48)
    rsicd = _subset_json(SHARED_DATA / "rsicd" / "dataset_rsicd.json", root / "rsicd.json", 24)
    out = []
    for name, js, images in [("ucm", ucm, SHARED_DATA / "ucm_captions" / "images"),
                             ("rsicd", rsicd, SHARED_DATA / "rsicd" / "images")]:
        shutil.rmtree(root / name, ignore_errors=True)
        shards_api.build("karpathy", js, root / name, images=str(images), shard_size=16, progress=False)
        out.append(root / name)
    return out


def index_options(folders: list[Path], out: Path, **ann: object) -> "IndexOptions":
    """Options for a quiet CPU build of ``folders`` with the test model."""
    from search.options import AnnOptions, IndexOptions

    return IndexOptions(model=MODEL, shards=[str(f) for f in folders], out=str(out), device="cpu",
                        batch_size=16, progress=False, overwrite=True, ann=AnnOptions(**ann))


def dist_build(rank: int, world: int, folders: list[str], out: str) -> dict:
    """Rank worker for ``run_distributed``: build the index with ``world`` gloo processes."""
    from pathlib import Path as _Path

    from search.build import build_index

    path = build_index(index_options([_Path(f) for f in folders], _Path(out)))
    return {"rank": rank, "path": str(path)}
