"""faiss index choice, approximate indexes and their measured recall@10."""

from __future__ import annotations

import numpy as np
import pytest

from search import ann
from search.errors import SearchError
from search.options import AnnOptions


def clustered(n: int, dim: int, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (embeddings have such structure; uniform ones do not)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_choice_by_size_and_memory_budget():
    opts = AnnOptions(exact_max=50_000, memory_mb=4096)
    assert ann.choose(10_000, 512, opts).kind == "flat"
    assert ann.choose(100_000, 512, opts).kind == "hnsw"
    assert ann.choose(1_000_000, 512, opts).kind == "ivf"       # 2 GB of vectors fit 4 GiB
    small = AnnOptions(memory_mb=256)
    pq = ann.choose(1_000_000, 512, small)
    assert pq.kind == "ivfpq" and pq.params["nlist"] == 1024
    # code size from the budget: 1M x (m + 8 id bytes) must fit what the lists leave of 256 MiB
    assert 512 % pq.params["m"] == 0 and 1_000_000 * (pq.params["m"] + 8) <= 256 * 2**20
    assert ann.choose(100_000, 512, AnnOptions(memory_mb=100)).kind == "ivfpq"  # HNSW graph would not fit
    assert ann.choose(10, 512, AnnOptions(kind="hnsw")).kind == "hnsw"       # forced
    with pytest.raises(SearchError, match="memory budget 1 MiB is too small for 1000000 vectors"):
        ann.choose(1_000_000, 512, AnnOptions(memory_mb=1))


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_index_recall_is_measured_and_tuned(kind):
    x = clustered(4000, 32)
    opts = AnnOptions(kind=kind, memory_mb=0.1 if kind == "ivfpq" else 4096)
    choice = ann.choose(len(x), 32, opts)
    assert choice.kind == kind
    index = ann.build(x, choice)
    assert index.ntotal == len(x)
    queries = {"image": x[:300], "other": clustered(300, 32, seed=1)}
    tuned = ann.tune(index, kind, x, queries)
    # the stored recall is the recall of the index as left (knob set), recomputed here independently
    exact = np.argsort(-(queries["other"] @ x.T), axis=1)[:, :10]
    found = index.search(queries["other"], 10)[1]
    assert tuned["recall@10"]["other"] == pytest.approx(ann.recall_at_k(found, exact), abs=0.01)
    assert tuned["param"] in ("efSearch", "nprobe") and tuned["ladder"][-1]["value"] == tuned["value"]
    if kind != "ivfpq":  # uncompressed vectors reach the target on clustered data
        assert tuned["target_reached"] and min(tuned["recall@10"].values()) >= ann.TARGET_RECALL
    else:  # 0.1 MiB for 4000 vectors: 16 six-bit codes each, lossy (0.8 measured); stored as measured
        assert choice.params["m"] < 32 and 0.5 < min(tuned["recall@10"].values()) < 1.0


def test_recall_at_k_counts_overlap():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    found = np.array([[3, 2, 9, 8], [4, 5, 6, 7]])
    assert ann.recall_at_k(found, exact, k=4) == pytest.approx((2 / 4 + 1) / 2)


def test_index_build_above_exact_max_uses_hnsw_and_stores_its_recall(tmp_path):
    from search.store import SearchIndex, write_index

    x = clustered(3000, 16)
    choice = ann.choose(len(x), 16, AnnOptions(exact_max=1000))
    index = ann.build(x, choice)
    tuned = ann.tune(index, choice.kind, x, {"image": x[:200]})
    items = [{"uid": f"s:val/{i}", "key": str(i), "captions": [], "row": i} for i in range(len(x))]
    meta = {"model": {}, "dim": 16, "count": len(x), "index": {**choice.to_dict(), "search": tuned}}
    write_index(tmp_path / "idx", index, x, items, meta)
    again = SearchIndex(tmp_path / "idx")
    assert again.meta["index"]["kind"] == "hnsw"
    assert again.index.hnsw.efSearch == tuned["value"]  # the tuned knob is set again on load
    _, rows = again.search(x[:200], 10)
    assert ann.recall_at_k(rows, ann.exact_neighbors(x, x[:200], 10)) >= ann.TARGET_RECALL


@pytest.mark.parametrize("ann_ms, kept", [(1.0, "hnsw"), (9.0, "flat")])
def test_auto_keeps_exact_search_when_the_tuned_index_is_no_faster(monkeypatch, ann_ms, kept):
    x = clustered(3000, 16)
    # first call times the approximate index, second exact search
    times = iter([ann_ms, 5.0])
    monkeypatch.setattr(ann, "single_query_ms", lambda index, queries, k=10: next(times))
    built = ann.build_tuned(x, AnnOptions(exact_max=1000), {"image": x[:100]})
    assert built.choice.kind == kept and built.index.ntotal == 3000
    assert built.tuned["latency_ms"] == {"approximate": ann_ms, "exact": 5.0}
    if kept == "flat":
        assert built.choice.reason.endswith(f"took {ann_ms:.2f} ms per query vs 5.00 ms exact: exact search")
        assert built.tuned["recall@10"] == {"image": 1.0} and built.tuned["param"] is None
    # forced kinds and budgets too small for exact vectors never fall back
    forced = ann.build_tuned(x, AnnOptions(kind="hnsw"), {"image": x[:100]})
    assert forced.choice.kind == "hnsw" and "latency_ms" not in forced.tuned
