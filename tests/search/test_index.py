"""search index + query on small real data: contents, self-retrieval, model identity, 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from search.build import build_index
from search.errors import SearchError
from search.model import load
from search.query import Searcher, format_table
from search.store import SearchIndex
from tests.distutil import run_distributed
from tests.search.util import MODEL, build_collection, dist_build, index_options


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> list[Path]:
    return build_collection(tmp_path_factory.mktemp("search_shards"))


@pytest.fixture(scope="module")
def index_dir(collection, tmp_path_factory) -> Path:
    return build_index(index_options(collection, tmp_path_factory.mktemp("search_idx") / "idx"))


def test_index_keeps_every_item_with_captions_labels_and_metadata(index_dir, collection):
    index = SearchIndex(index_dir)
    meta = index.meta
    assert meta["count"] == len(index) == 72 and meta["dim"] == 128
    assert meta["inputs"] == {"total": 72, "indexed": 72, "skipped": 0, "skipped_reasons": {}, "skipped_items": []}
    assert meta["index"]["kind"] == "flat" and meta["recall@10"] == 1.0
    assert set(meta["index"]["search"]["recall@10"]) == {"image", "text"}
    assert meta["model"]["spec"] == MODEL and len(meta["model"]["digest"]) == 16
    # 3 UCM shards then 2 RSICD shards, in folder then file order
    assert [it["source"] for it in index.items] == ["ucm"] * 48 + ["rsicd"] * 24
    assert [it["row"] for it in index.items] == list(range(72))
    ucm_json = json.loads((collection[0] / "val" / "stats.json").read_text())
    assert ucm_json["written"] == 48
    rsicd = [it for it in index.items if it["source"] == "rsicd"]
    assert all(it["classname"] and isinstance(it["label"], int) for it in rsicd)  # RSICD's scene labels
    assert all(len(it["captions"]) == 5 for it in index.items)
    norms = np.linalg.norm(index.vectors, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # the recorded byte range is the image: it decodes
    from search.embed import decode_image

    assert decode_image(index.image_bytes(5)).size == (256, 256)


def test_every_indexed_image_queried_by_itself_comes_back_first(index_dir):
    index = SearchIndex(index_dir)
    searcher = Searcher(index, device="cpu")
    from search.embed import decode_image

    for row, item in enumerate(index.items):
        hits = searcher.by_image(decode_image(index.image_bytes(row)), k=3)
        assert hits[0].uid == item["uid"], (row, [(h.uid, h.score) for h in hits])
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_key_query_finds_itself_first_and_text_query_ranks_by_score(index_dir):
    searcher = Searcher(SearchIndex(index_dir), device="cpu")
    hits = searcher.by_key("rsicd:val/" + searcher.index.items[60]["key"], k=5)
    assert hits[0].row == 60 and len(hits) == 5
    text_hits = searcher.by_text("many planes are parked next to a long building", k=7)
    scores = [h.score for h in text_hits]
    assert len(text_hits) == 7 and scores == sorted(scores, reverse=True)
    # the scores are the cosine similarities of the stored vectors
    q = searcher.encoder.texts(["many planes are parked next to a long building"])[0]
    assert scores[0] == pytest.approx(float(searcher.index.vectors[text_hits[0].row] @ q), abs=1e-4)
    table = format_table(text_hits)
    assert table.splitlines()[0].split() == ["#", "score", "key", "class", "caption"] and len(table.splitlines()) == 8


def test_ambiguous_and_unknown_keys_are_clear(index_dir, collection, tmp_path):
    index = SearchIndex(index_dir)
    with pytest.raises(SearchError, match=r"unknown key 'no-such-key': not in index .* \(72 items\)"):
        index.row_of("no-such-key")
    # the same folder given twice: every key is in two places and must be qualified by its source
    build_index(index_options([collection[1], collection[1]], tmp_path / "twice"))
    twice = SearchIndex(tmp_path / "twice")
    key = twice.items[0]["key"]
    assert [it["source"] for it in twice.items[::24]] == ["rsicd", "rsicd-2"]
    with pytest.raises(SearchError, match=rf"key '{key}' is in 2 places; give one of: rsicd:val/{key}, rsicd-2:val/{key}"):
        twice.row_of(key)
    assert twice.row_of(f"rsicd-2:val/{key}") == 24


def test_query_with_another_model_is_refused(index_dir, tmp_path):
    from train.api import save_local_dir

    bundle, _ = load(MODEL, "cpu")
    with pytest.raises(SearchError, match=r"model mismatch: index .* was built with orbit-tiny .* but orbit-micro"):
        Searcher(SearchIndex(index_dir), model="orbit-micro", device="cpu").by_text("a river", 3)
    # same architecture, other weights (e.g. a run directory that trained on): also refused
    import torch

    with torch.no_grad():
        bundle.model.text_projection.add_(0.01)
    save_local_dir(bundle, tmp_path / "other")
    with pytest.raises(SearchError, match=r"model mismatch: .* but local-dir:.* is orbit-tiny with digest"):
        Searcher(SearchIndex(index_dir), model=f"local-dir:{tmp_path / 'other'}", device="cpu").by_text("a river", 3)


def test_index_records_a_model_that_later_changes(collection, tmp_path):
    from train.api import save_local_dir

    bundle, _ = load(MODEL, "cpu")
    save_local_dir(bundle, tmp_path / "model")
    opts = index_options(collection[1:], tmp_path / "idx")
    opts.model = f"local-dir:{tmp_path / 'model'}"
    build_index(opts)
    assert len(Searcher(SearchIndex(tmp_path / "idx"), device="cpu").by_text("a beach", 3)) == 3
    import torch

    with torch.no_grad():
        bundle.model.visual.proj.mul_(2.0)
    save_local_dir(bundle, tmp_path / "model")  # the folder now holds other weights
    with pytest.raises(SearchError, match="model mismatch"):
        Searcher(SearchIndex(tmp_path / "idx"), device="cpu").by_text("a beach", 3)


def test_unreadable_samples_are_skipped_with_reasons(collection, tmp_path):
    import io
    import tarfile

    bad = tmp_path / "bad" / "val"
    bad.mkdir(parents=True)
    with tarfile.open(bad / "val-000000.tar", "w") as tar:
        src = sorted((collection[1] / "val").glob("*.tar"))[0]
        with tarfile.open(src) as s:
            for m in s.getmembers()[:3]:  # one real sample (jpg, json, txt)
                tar.addfile(m, s.extractfile(m))
        for name, data in [("broken.jpg", b"not a jpeg"), ("broken.txt", b"a caption"), ("noimage.txt", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    build_index(index_options([tmp_path / "bad"], tmp_path / "idx"))
    meta = SearchIndex(tmp_path / "idx").meta
    inputs = meta["inputs"]
    assert (inputs["total"], inputs["indexed"], inputs["skipped"]) == (3, 1, 2)
    assert inputs["skipped_reasons"] == {"unreadable image": 1, "sample without an image": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SearchError, match=r"no shards in .*empty: expected \*\.tar files"):
        build_index(index_options([tmp_path / "empty"], tmp_path / "idx2"))


def test_an_interrupted_build_reuses_parts_of_unchanged_shards_only(collection, tmp_path, monkeypatch):
    import os

    from search import build as build_mod

    embedded: list[str] = []
    real_embed = build_mod.embed_shard
    monkeypatch.setattr(build_mod, "embed_shard", lambda shard, enc, bar: (embedded.append(shard.path),
                                                                            real_embed(shard, enc, bar))[1])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after embedding, before the index was written

    with monkeypatch.context() as m:
        m.setattr(build_mod, "finish", crash)
        with pytest.raises(KeyboardInterrupt):
            build_index(index_options(collection[1:], tmp_path / "idx"))
    assert len(embedded) == 2 and list(tmp_path.glob(".idx.parts-*/shard-*.json"))
    first_tar = sorted((collection[1] / "val").glob("*.tar"))[0]
    os.utime(first_tar, ns=(os.stat(first_tar).st_atime_ns, os.stat(first_tar).st_mtime_ns + 10**9))
    embedded.clear()
    build_index(index_options(collection[1:], tmp_path / "idx"))
    assert embedded == [str(first_tar.resolve())]  # the touched shard only
    assert SearchIndex(tmp_path / "idx").meta["count"] == 24 and not list(tmp_path.glob(".idx.parts-*"))


@pytest.mark.slow  # ~20 s on 2 idle cores, ~40 s on busy ones (two spawned processes import torch)
def test_two_process_build_equals_one_process_build(collection, index_dir, tmp_path):
    out = tmp_path / "idx2"
    results = run_distributed(dist_build, 2, [str(f) for f in collection], str(out), timeout=240)
    assert [r["path"] for r in results] == [str(out)] * 2
    one, two = SearchIndex(index_dir), SearchIndex(out)
    assert [it["uid"] for it in two.items] == [it["uid"] for it in one.items]
    assert [(it["captions"], it["label"], it["offset"]) for it in two.items] == \
        [(it["captions"], it["label"], it["offset"]) for it in one.items]
    np.testing.assert_allclose(np.asarray(two.vectors), np.asarray(one.vectors), atol=1e-5)
    assert two.meta["world_size"] == 2 and two.meta["model"] == one.meta["model"]
    s1, r1 = one.search(np.asarray(one.vectors[:10]), 5)
    s2, r2 = two.search(np.asarray(one.vectors[:10]), 5)
    assert (r1 == r2).all()
    assert not list(tmp_path.glob(".idx2.parts-*")), "per-rank parts are removed once assembled"


def test_real_build_with_an_approximate_index_stores_its_measured_recall(collection, tmp_path):
    build_index(index_options(collection, tmp_path / "hnsw", kind="hnsw", recall_queries=72))
    meta = SearchIndex(tmp_path / "hnsw").meta
    assert meta["index"]["kind"] == "hnsw" and meta["index"]["reason"] == "forced by --index"
    search = meta["index"]["search"]
    assert search["queries"] == {"image": 72, "text": 72} and search["param"] == "efSearch"
    assert meta["recall@10"] == min(search["recall@10"].values()) >= 0.95
    # auto above exact_max: HNSW is built, tuned, and timed against exact search
    build_index(index_options(collection, tmp_path / "auto", exact_max=20, recall_queries=72))
    auto = SearchIndex(tmp_path / "auto").meta["index"]
    assert set(auto["search"]["latency_ms"]) == {"approximate", "exact"}
    assert auto["kind"] == "hnsw" or auto["reason"].startswith("hnsw {'M': 32, 'efConstruction': 80} needed efSearch=")


@pytest.mark.slow
def test_torchrun_cli_build_equals_one_process_build(collection, index_dir, tmp_path):
    """The user's path: `torchrun --nproc_per_node 2 -m search index ...` (each rank joins by env)."""
    import os
    import subprocess
    import sys

    from tests.distutil import free_port

    from tests import REPO_ROOT as root
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "search", "index", "--model", MODEL, "--shards", *map(str, collection), "--out", str(tmp_path / "tr"),
           "--device", "cpu", "--batch-size", "16", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "indexed 72 of 72 inputs" in res.stdout and "2 process(es)" in res.stdout
    one, two = SearchIndex(index_dir), SearchIndex(tmp_path / "tr")
    assert [it["uid"] for it in two.items] == [it["uid"] for it in one.items]
    np.testing.assert_allclose(np.asarray(two.vectors), np.asarray(one.vectors), atol=1e-5)
