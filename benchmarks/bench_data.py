"""Shards the benchmarks read: built once by the ``shards`` package and reused.

``synthetic`` renders procedural scenes at any size (no download, what the GPU box
uses); ``rsicd`` takes the real 224 px RSICD JPEGs in ../shared/data, each repeated
``repeat`` times (through symlinks, so keys stay unique) to make epochs long enough to
measure. Both land in ``<cache>/<name>/train/train-NNNNNN.tar`` with sizes.json.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from benchmarks.openclip_ref import ROOT

SHARED_RSICD = ROOT.parent / "shared" / "data" / "rsicd"
DEFAULT_CACHE = ROOT / ".cache" / "bench_shards"


def _ready(out: Path, options: dict) -> bool:
    """True when ``out`` holds a finished build made with exactly ``options``."""
    marker = out / "bench_options.json"
    return marker.is_file() and json.loads(marker.read_text()) == options and (out / "train" / "sizes.json").is_file()


def _mark(out: Path, options: dict) -> None:
    (out / "bench_options.json").write_text(json.dumps(options, sort_keys=True))


def synthetic_shards(count: int, image_size: int, shard_size: int = 250, workers: int = 1,
                     cache: Path = DEFAULT_CACHE) -> Path:
    """``count`` synthetic scenes of ``image_size`` px, all in the train split."""
    from shards.api import build

    options = {"source": "synthetic", "count": count, "image_size": image_size, "shard_size": shard_size}
    out = Path(cache) / f"synthetic-{image_size}px-{count}"
    if not _ready(out, options):
        build("synthetic", None, out, count=count, image_size=image_size, shard_size=shard_size,
              val_fraction=0.0, test_fraction=0.0, workers=workers, overwrite=True, progress=False)
        _mark(out, options)
    return out


def rsicd_shards(repeat: int = 4, shard_size: int = 100, source: Path = SHARED_RSICD,
                 cache: Path = DEFAULT_CACHE) -> Path:
    """Every RSICD image in ``source`` (224 px JPEG) ``repeat`` times, with its captions.

    Raises:
        FileNotFoundError: ``source`` (../shared/data/rsicd) is absent.
    """
    from shards.api import build

    meta = source / "dataset_rsicd.json"
    if not meta.is_file():
        raise FileNotFoundError(f"RSICD subset not found at {source} (see ../shared/data/README.md)")
    options = {"source": "rsicd", "repeat": repeat, "shard_size": shard_size, "from": str(source)}
    out = Path(cache) / f"rsicd-x{repeat}"
    if _ready(out, options):
        return out
    links = Path(cache) / f"rsicd-x{repeat}-input"
    rows = []
    for r in range(repeat):
        folder = links / f"copy{r}"
        folder.mkdir(parents=True, exist_ok=True)
        for img in json.loads(meta.read_text())["images"]:
            link = folder / img["filename"]
            if not link.exists():
                link.symlink_to((source / "images" / img["filename"]).resolve())
            rows += [(f"copy{r}/{img['filename']}", s["raw"]) for s in img["sentences"]]
    with open(links / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "split"])
        writer.writerows([(path, caption, "train") for path, caption in rows])
    # Repeats are pixel-identical on purpose: keep them (no dedup).
    build("csv", links / "captions.csv", out, images=str(links), split_column="split", dedup=False,
          shard_size=shard_size, overwrite=True, progress=False)
    _mark(out, options)
    return out


def shard_urls(root: Path, split: str = "train") -> tuple[str, int]:
    """Brace pattern of a split's tars (for open_clip_train) and its sample count."""
    sizes = json.loads((Path(root) / split / "sizes.json").read_text())
    names = sorted(sizes)
    first, last = names[0], names[-1]
    stem = first.rsplit("-", 1)[0]
    lo, hi = first.rsplit("-", 1)[1].split(".")[0], last.rsplit("-", 1)[1].split(".")[0]
    expected = [f"{stem}-{i:0{len(lo)}d}.tar" for i in range(int(lo), int(hi) + 1)]
    if expected != names:
        raise ValueError(f"{root}/{split}: shard names are not a contiguous range: {names[:3]}...")
    return f"{Path(root) / split}/{stem}-{{{lo}..{hi}}}.tar", sum(sizes.values())
