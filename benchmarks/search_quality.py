"""Search quality: precision@10 of text -> image and image -> image on held-out labelled images.

    python -m benchmarks.search_quality --model runs/recipes/rsicd_scratch_cpu --baseline orbit-tiny
    python -m benchmarks.search_quality --model orbit-tiny --baseline orbit-micro --limit 40   # smoke test

Data (``../shared/data``, never seen in training): the UCM-captions val split (210 images;
class of each image from ``ucm_captions/image_source_map.csv``, 21 UC Merced classes) and
the RSICD val split (200 images, RSICD's scene ``label``). Each is built into shards
(original resolution, labels in the sample JSON) and indexed with ``search index``, exactly
as a user would.

- text -> image P@10: for every class present, the query "an aerial photograph of
  {class}" (readable class names: the shards tables), P@10 = share of the top 10 with that
  class; the mean over classes is reported.
- image -> image P@10 by label: every image queries the index by its key; itself (rank 1)
  is left out, and P@10 = share of the next 10 with its class; the mean over images.
- ``ceiling``: the best P@10 possible (a class with fewer than 10 images caps it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.report import write_report
from benchmarks.search_ann import cpu_model
from search.build import build_index
from search.options import AnnOptions, IndexOptions
from search.query import Searcher
from search.store import SearchIndex
from shards import api as shards_api
from shards.classnames import AID, UCM
from shards.sources.karpathy import readable_label

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("ORBITCLIP_DATA", ROOT.parent / "shared" / "data"))
TEMPLATE = "an aerial photograph of {}"


def _labelled_val(dataset: str, work: Path, limit: int | None) -> tuple[Path, Path]:
    """A Karpathy JSON of the val split with a string ``label`` per image, and its image folder."""
    if dataset == "ucm_captions":
        src, images = DATA / "ucm_captions" / "dataset.json", DATA / "ucm_captions" / "images"
        with open(DATA / "ucm_captions" / "image_source_map.csv", newline="") as f:
            classes = {Path(r["caption_filename"]).stem: r["ucmerced_class"] for r in csv.DictReader(f)}
    else:
        src, images, classes = DATA / "rsicd" / "dataset_rsicd.json", DATA / "rsicd" / "images", None
    data = json.loads(src.read_text(encoding="utf-8"))
    val = [im for im in data["images"] if im.get("split") == "val"]
    if classes is not None:
        val = [{**im, "label": classes[Path(im["filename"]).stem]} for im in val]
    if limit:
        val = val[::max(1, len(val) // limit)][:limit]  # evenly spaced: the JSON is class-sorted
    out = work / f"{dataset}_val_labelled.json"
    out.write_text(json.dumps({**data, "images": val}), encoding="utf-8")
    return out, images


def ensure_shards(dataset: str, work: Path, limit: int | None) -> Path:
    """Shards of the labelled val split (built once per ``work`` folder)."""
    out = work / f"{dataset}-shards"
    if not (out / "manifest.json").is_file():
        js, images = _labelled_val(dataset, work, limit)
        shards_api.build("karpathy", js, out, images=str(images), progress=False, overwrite=True)
    return out


def readable(classname: str) -> str:
    """Prompt name of a UC Merced folder name or an RSICD scene label."""
    return UCM.get(classname) or AID.get(classname) or readable_label(classname)


def precision_at_10(index: SearchIndex, searcher: Searcher) -> dict[str, float]:
    """Text -> image (mean over classes) and image -> image (mean over images) P@10, with ceilings."""
    labels = [it["classname"] for it in index.items]
    counts = Counter(labels)
    text_p, text_ceiling = [], []
    for cls in sorted(counts):
        hits = searcher.by_text(TEMPLATE.format(readable(cls)), 10)
        text_p.append(sum(h.classname == cls for h in hits) / 10)
        text_ceiling.append(min(counts[cls], 10) / 10)
    image_p, image_ceiling = [], []
    for row, it in enumerate(index.items):
        hits = [h for h in searcher.by_key(it["uid"], 11) if h.row != row][:10]
        image_p.append(sum(h.classname == it["classname"] for h in hits) / 10)
        image_ceiling.append(min(counts[it["classname"]] - 1, 10) / 10)
    return {"text_p@10": float(np.mean(text_p)), "image_p@10": float(np.mean(image_p)),
            "text_ceiling": float(np.mean(text_ceiling)), "image_ceiling": float(np.mean(image_ceiling)),
            "classes": len(counts)}


def query_latency_ms(searcher: Searcher, queries: list[str]) -> tuple[float, float]:
    """p50/p99 of a whole text query (tokenize, encode, search) as the CLI runs it."""
    searcher.by_text(queries[0], 10)  # load the model first: startup is not query latency
    times = []
    for q in queries:
        t0 = time.perf_counter()
        searcher.by_text(q, 10)
        times.append(1e3 * (time.perf_counter() - t0))
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def run(models: list[tuple[str, str]], datasets: list[str], work: Path, limit: int | None) -> list[dict]:
    rows = []
    for dataset in datasets:
        shards = ensure_shards(dataset, work, limit)
        for label, spec in models:
            out = work / "indexes" / f"{dataset}-{label}"
            build_index(IndexOptions(model=spec, shards=[str(shards)], out=str(out), device="cpu",
                                     overwrite=True, progress=False, ann=AnnOptions()))
            index = SearchIndex(out)
            searcher = Searcher(index, device="cpu")
            p = precision_at_10(index, searcher)
            p50, p99 = query_latency_ms(searcher, [TEMPLATE.format(readable(c)) for c in sorted(
                {it["classname"] for it in index.items})])
            row = {"dataset": f"{dataset} val", "model": label, "images": len(index), "classes": p["classes"],
                   "text->image P@10": round(100 * p["text_p@10"], 1),
                   "image->image P@10": round(100 * p["image_p@10"], 1),
                   "embed_s": index.meta["build_seconds"]["embed"],
                   "query_p50_ms": round(p50, 1), "query_p99_ms": round(p99, 1),
                   "spec": spec, "digest": index.meta["model"]["digest"]}
            print(f"[search_quality] {row}", flush=True)
            rows.append(row)
        rows.append({"dataset": f"{dataset} val", "model": "ceiling (perfect ranking)", "images": len(index),
                     "classes": p["classes"], "text->image P@10": round(100 * p["text_ceiling"], 1),
                     "image->image P@10": round(100 * p["image_ceiling"], 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the trained model (run dir or any eval spec)")
    p.add_argument("--name", default=None, help="its label in the table (default: the spec)")
    p.add_argument("--baseline", default="orbit-tiny", help="random-init architecture next to it")
    p.add_argument("--datasets", nargs="+", choices=["ucm_captions", "rsicd"], default=["ucm_captions", "rsicd"])
    p.add_argument("--limit", type=int, default=None, help="at most N images per dataset (smoke tests)")
    p.add_argument("--work", default=str(ROOT / "runs" / "search_quality"), help="shards and indexes go here")
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "search_quality.json"))
    a = p.parse_args(argv)
    for d in a.datasets:
        need = DATA / ("ucm_captions" if d == "ucm_captions" else "rsicd")
        if not need.is_dir():
            raise SystemExit(f"[search_quality] {need} is absent (set ORBITCLIP_DATA to the folder holding it)")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    models = [(a.name or a.model, a.model), (f"{a.baseline} (random init)", a.baseline)]
    t0 = time.perf_counter()
    rows = run(models, a.datasets, work, a.limit)
    write_report(a.out, "search_quality", rows, cpu_model=cpu_model(), template=TEMPLATE, limit=a.limit,
                 seconds=round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
