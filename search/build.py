"""``search index``: embed every image of a shard collection and build the faiss index.

Under ``torchrun`` (or any launcher that sets RANK/WORLD_SIZE) rank r embeds shards
r, r + world, r + 2 world ... and writes one part per shard next to the output
(``.INDEX.parts-<model digest>/``, on storage every rank sees). Rank 0 then assembles the
parts in global shard order, so the index is the same whatever the number of processes,
builds the faiss index and writes the folder. A part already on disk from an interrupted
build with the same model is reused, not embedded again.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from search import ann
from search.collection import Sample, Shard, list_shards, read_shard
from search.embed import Encoder, decode_image
from search.errors import SearchError
from search.model import ModelIdentity, load, pick_device
from search.options import IndexOptions
from search.store import write_index
from train.api import DistEnv, dist_env_from, make_comm


def _parts_dir(out: Path, digest: str) -> Path:
    return out.with_name(f".{out.name}.parts-{digest}")


def _flush(batch: list[tuple[Sample, Image.Image]], encoder: Encoder, vectors: list[np.ndarray],
           items: list[dict[str, Any]]) -> None:
    if not batch:
        return
    vectors.append(encoder.images([im for _, im in batch]))
    for s, _ in batch:
        items.append({"uid": s.uid, "key": s.key, "captions": s.captions, "label": s.label, "classname": s.classname,
                      "split": s.split, "source": s.uid.split(":", 1)[0], "shard": s.shard,
                      "offset": s.image_offset, "size": s.image_size})
    batch.clear()


def embed_shard(shard: Shard, encoder: Encoder, bar: tqdm) -> tuple[np.ndarray, list[dict], list[tuple[str, str]]]:
    """Vectors, item records and skipped ``(uid, reason)`` of one shard, in file order."""
    skipped: list[tuple[str, str]] = []
    vectors: list[np.ndarray] = []
    items: list[dict[str, Any]] = []
    batch: list[tuple[Sample, Image.Image]] = []
    for sample in read_shard(shard, skipped):
        bar.update(1)
        try:
            image = decode_image(sample.image, f"image {sample.uid}")
        except SearchError as e:
            # decode_image says "cannot read <what>: <why>"; summaries group reasons by the text before ':'
            skipped.append((sample.uid, "unreadable image: " + str(e).split(": ", 1)[-1]))
            continue
        batch.append((sample, image))
        if len(batch) >= encoder.batch_size:
            _flush(batch, encoder, vectors, items)
    _flush(batch, encoder, vectors, items)
    dim = vectors[0].shape[1] if vectors else 0
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), items, skipped


def _fingerprint(shard: Shard) -> str:
    # a part is reused only for the very same file: position, path, size and modification time
    st = os.stat(shard.path)
    return f"{shard.index}|{shard.path}|{st.st_size}|{st.st_mtime_ns}"


def _part_done(folder: Path, shard: Shard) -> bool:
    path = folder / f"shard-{shard.index:06d}.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("fingerprint") == _fingerprint(shard)
    except ValueError:
        return False


def _save_part(folder: Path, shard: Shard, vectors: np.ndarray, items: list[dict], skipped: list) -> None:
    stem = folder / f"shard-{shard.index:06d}"
    np.save(f"{stem}.npy", vectors)
    tmp = Path(f"{stem}.json.tmp")
    tmp.write_text(json.dumps({"shard": shard.path, "fingerprint": _fingerprint(shard), "items": items,
                               "skipped": skipped}, ensure_ascii=False))
    tmp.rename(f"{stem}.json")  # written last: its presence means the part is complete


def _embed_rank(shards: list[Shard], env: DistEnv, encoder: Encoder, parts: Path, progress: bool) -> None:
    mine = [s for s in shards if s.index % env.world_size == env.rank]
    todo = [s for s in mine if not _part_done(parts, s)]
    expected = [s.expected for s in todo]
    total = sum(expected) if all(e is not None for e in expected) else None
    desc = "embedding" + (f" [rank {env.rank}/{env.world_size}]" if env.distributed else "")
    with tqdm(total=total, desc=desc, unit="img", disable=not progress or None) as bar:
        if len(todo) < len(mine):
            bar.write(f"[search] reusing {len(mine) - len(todo)} shard(s) embedded by an earlier run")
        for shard in todo:
            vectors, items, skipped = embed_shard(shard, encoder, bar)
            _save_part(parts, shard, vectors, items, skipped)


def assemble(shards: list[Shard], parts: Path, dim: int) -> tuple[np.ndarray, list[dict], list[tuple[str, str]]]:
    """All parts in global shard order; a uid seen twice keeps its first occurrence."""
    vectors, items, skipped, seen = [], [], [], set()
    for shard in shards:
        stem = parts / f"shard-{shard.index:06d}"
        if not _part_done(parts, shard):
            raise SearchError(f"shard {shard.path} was not embedded by any rank (did a rank load another model?)")
        part = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))
        vecs = np.load(f"{stem}.npy")
        skipped += [tuple(s) for s in part["skipped"]]
        keep = []
        for i, item in enumerate(part["items"]):
            if item["uid"] in seen:
                skipped.append((item["uid"], "duplicate key (kept the first)"))
                continue
            seen.add(item["uid"])
            keep.append(i)
            items.append(item)
        vectors.append(vecs[keep] if len(vecs) else np.zeros((0, dim), np.float32))
    for row, item in enumerate(items):
        item["row"] = row
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), items, skipped


def _recall_queries(vectors: np.ndarray, items: list[dict], encoder: Encoder, n: int, seed: int) -> dict:
    # Image queries are indexed vectors; text queries are indexed captions. Text vectors sit
    # apart from image vectors (the modality gap), so an IVF index can do worse for them.
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))
    captions = [items[r]["captions"][0] for r in rows if items[r]["captions"] and items[r]["captions"][0].strip()]
    sets = {"image": np.ascontiguousarray(vectors[rows])}
    if captions:
        sets["text"] = encoder.texts(captions)
    return sets


def _skip_summary(total: int, indexed: int, skipped: list[tuple[str, str]]) -> dict[str, Any]:
    reasons = Counter(reason.split(":")[0] for _, reason in skipped)
    return {"total": total, "indexed": indexed, "skipped": len(skipped), "skipped_reasons": dict(reasons),
            "skipped_items": [{"item": u, "reason": r} for u, r in skipped[:1000]]}


def finish(opts: IndexOptions, identity: ModelIdentity, encoder: Encoder, shards: list[Shard], parts: Path,
           world: int, embed_s: float, t_start: float, load_s: float = 0.0) -> Path:
    """Rank 0: assemble the parts, build and tune the faiss index, write the folder.

    ``embed_s`` is the embedding wall time (model loading, ``load_s``, excluded; with several
    ranks, until the slowest one is done); ``t_start`` the ``perf_counter`` at the start of the build.
    """
    vectors, items, skipped = assemble(shards, parts, identity.embed_dim)
    total = len(items) + len(skipped)
    if not items:
        reasons = ", ".join(f"{k} {v}" for k, v in Counter(r for _, r in skipped).most_common(3)) or "no samples"
        raise SearchError(f"nothing to index: {total} input(s), all skipped ({reasons})")
    built = ann.build_tuned(vectors, opts.ann,
                            _recall_queries(vectors, items, encoder, opts.ann.recall_queries, opts.ann.seed))
    choice, index, tuned = built.choice, built.index, built.tuned
    meta = {
        "model": identity.to_dict(), "dim": int(vectors.shape[1]), "count": len(items),
        "index": {**choice.to_dict(), "search": tuned},
        "recall@10": min(tuned["recall@10"].values()),
        "build_seconds": {"load_model": round(load_s, 2), "embed": round(embed_s, 2),
                          "index": round(built.build_s, 2), "tune": round(built.tune_s, 2),
                          "total": round(time.perf_counter() - t_start, 2)},
        "inputs": _skip_summary(total, len(items), skipped),
        "shards": {"folders": [str(Path(f).resolve()) for f in opts.shards], "splits": opts.splits,
                   "count": len(shards)},
        "world_size": world, "device": str(encoder.device),
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__},
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    out = write_index(opts.out, index, vectors, items, meta, overwrite=opts.overwrite)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def _init_dist(env: DistEnv) -> bool:
    """Join the job's process group if the launcher asked for one; True if we created it."""
    if not env.distributed or dist.is_initialized():
        return False
    # gloo: only barriers go over it, and it works next to CPU and GPU ranks alike; a long
    # timeout because ranks with more shards finish embedding later
    dist.init_process_group("gloo", init_method=env.init_method, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(hours=12))
    return True


def build_index(opts: IndexOptions, env: DistEnv | None = None) -> Path:
    """Embed the collection (this rank's share of it) and, on rank 0, write the index.

    Returns:
        The index folder (on every rank; only rank 0 writes it).

    Raises:
        SearchError: bad options, no shards, an unloadable model, nothing to index.
    """
    t_start = time.perf_counter()
    opts.validate()
    env = env or dist_env_from(os.environ)
    shards = list_shards(opts.shards, opts.splits)
    device = pick_device(opts.device, env.local_rank)
    bundle, identity = load(opts.model, device)
    t_loaded = time.perf_counter()
    encoder = Encoder(bundle, device, opts.batch_size)
    out = Path(opts.out)
    parts = _parts_dir(out, identity.digest)
    parts.mkdir(parents=True, exist_ok=True)
    created = _init_dist(env)
    try:
        _embed_rank(shards, env, encoder, parts, opts.progress and env.is_main)
        comm = make_comm(env)
        comm.barrier()  # every part is on disk before rank 0 reads them
        embed_s = time.perf_counter() - t_loaded
        # Rank 0 assembles; the others return only once the index exists, and a failure on
        # rank 0 reaches every rank (PeerError naming it) instead of leaving them waiting.
        with comm.agreement("writing the index"):
            if env.is_main:
                finish(opts, identity, encoder, shards, parts, env.world_size, embed_s, t_start,
                       load_s=t_loaded - t_start)
    finally:
        if created:
            dist.destroy_process_group()
    return out
