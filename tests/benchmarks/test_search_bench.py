"""Benchmarks of search at tiny size: each runs and writes its JSON (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import search_ann, search_quality


def test_search_ann_smoke(tmp_path):
    out = tmp_path / "ann.json"
    assert search_ann.main(["--sizes", "1500", "--dim", "16", "--queries", "40", "--exact-max", "500",
                            "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "search_ann" and "cpu_model" in payload["meta"]
    for dist in ("uniform", "clustered"):
        rows = {r["choice"]: r for r in payload["rows"] if r["vectors"] == dist}
        # auto keeps HNSW (then exact search is measured beside it) or falls back to exact (then HNSW is)
        assert rows["auto"]["index"] in ("hnsw", "flat") and len(rows) == 3
        other = rows.get("exact (forced)") or rows["hnsw (forced)"]
        assert {rows["auto"]["index"], other["index"]} == {"hnsw", "flat"}
        assert rows["ivfpq, 64 MiB budget"]["index"] == "ivfpq"
        assert rows["auto"]["why"]["latency_ms"]["exact"] > 0
    exact = [r for r in payload["rows"] if r["index"] == "flat"]
    assert exact and all(r["recall@10"] == 1.0 for r in exact)
    assert all(0 < r["recall@10"] <= 1 and r["p99_ms"] >= r["p50_ms"] > 0 for r in payload["rows"])


def test_clustered_vectors_are_unit_and_seeded():
    a, b = search_ann.vectors(100, 8, "clustered", 1), search_ann.vectors(100, 8, "clustered", 1)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_search_quality_smoke(shared_data, tmp_path):
    out = tmp_path / "q.json"
    assert search_quality.main(["--model", "orbit-micro", "--baseline", "orbit-micro", "--limit", "24",
                                "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["dataset"] for r in rows] == ["ucm_captions val"] * 3 + ["rsicd val"] * 3
    assert rows[0]["images"] == 24 and rows[2]["model"] == "ceiling (perfect ranking)"
    for r in rows:
        assert 0 <= r["image->image P@10"] <= 100 and 0 <= r["text->image P@10"] <= 100
    # the same model twice gives the same numbers (the index and queries are deterministic)
    assert rows[0]["text->image P@10"] == rows[1]["text->image P@10"]


def test_readable_class_names():
    assert search_quality.readable("baseballdiamond") == "baseball diamond"
    assert search_quality.readable("StorageTanks") == "storage tanks"
    assert search_quality.readable("playfields") == "playfields"
