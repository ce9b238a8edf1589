"""Which faiss index a collection gets, building it, and measuring its recall@10.

Vectors are unit length and compared by inner product (= cosine). The choice by size:

- up to ``exact_max`` vectors: ``flat`` — exact brute force; at 50k x 512 a query is a
  few milliseconds, and recall is 1 by construction;
- above, ``hnsw`` while the graph (vectors + ``2 * M`` links each) fits the memory budget
  and the collection is at most ``HNSW_MAX`` (HNSW builds slowly on CPU: ~3 min per 100k
  vectors on one core, measured);
- ``ivf`` (inverted lists over exact vectors) while the vectors themselves fit the budget;
- ``ivfpq`` (product-quantized codes, size chosen from the budget) when they do not.

After building, the search-time knob (``efSearch`` / ``nprobe``) is raised along a ladder
until recall@10 against exact search reaches the target on the measuring queries, and the
whole ladder is returned for the index's metadata: the recall stored is measured, not assumed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from search.errors import SearchError
from search.options import AnnOptions

HNSW_MAX = 200_000
"""Largest collection ``auto`` gives HNSW (build time; IVF builds ~10x faster)."""
TARGET_RECALL = 0.95


@dataclass
class AnnChoice:
    """An index kind, its build parameters and why it was chosen."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nlist(n: int) -> int:
    # ~sqrt(n) lists, a power of two, at least 1 and at most n/39 (k-means needs points per list)
    want = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return int(max(1, min(want, n // 39 or 1)))


def _pq_m(dim: int, n: int, nlist: int, budget_bytes: float) -> int:
    """Largest number of 1-byte sub-quantizers that divides ``dim`` and fits the budget."""
    # what the coarse centroids leave, per vector, less the 8-byte id stored next to each code
    per_vector = (budget_bytes - nlist * dim * 4) / max(n, 1) - 8
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= 64]
    fitting = [m for m in divisors if m <= per_vector]
    if not fitting:
        raise SearchError(f"memory budget {budget_bytes / 2**20:.0f} MiB is too small for {n} vectors "
                          f"(even 1-byte codes need {(n * 9) / 2**20:.0f} MiB); raise --memory-mb")
    return max(fitting)


def choose(n: int, dim: int, opts: AnnOptions) -> AnnChoice:
    """The index for ``n`` vectors of size ``dim`` under ``opts`` (``kind`` may force one)."""
    budget = opts.memory_mb * 2**20
    flat_bytes = n * dim * 4
    hnsw_bytes = n * (dim * 4 + 2 * opts.hnsw_m * 4)
    kind = opts.kind
    if kind == "auto":
        if n <= opts.exact_max:
            kind, reason = "flat", f"{n} <= exact_max {opts.exact_max}: exact search"
        elif n <= HNSW_MAX and hnsw_bytes <= budget:
            kind, reason = "hnsw", f"{n} vectors, graph {hnsw_bytes / 2**20:.0f} MiB fits {opts.memory_mb:.0f} MiB"
        elif flat_bytes * 1.05 <= budget:
            kind, reason = "ivf", f"{n} vectors, {flat_bytes / 2**20:.0f} MiB fit {opts.memory_mb:.0f} MiB"
        else:
            kind, reason = "ivfpq", f"{n} vectors ({flat_bytes / 2**20:.0f} MiB) exceed {opts.memory_mb:.0f} MiB"
    else:
        reason = "forced by --index"
    if kind == "flat":
        return AnnChoice("flat", {}, reason)
    if kind == "hnsw":
        return AnnChoice("hnsw", {"M": opts.hnsw_m, "efConstruction": opts.ef_construction}, reason)
    nlist = _nlist(n)
    if kind == "ivf":
        return AnnChoice("ivf", {"nlist": nlist}, reason)
    m = _pq_m(dim, n, nlist, budget)
    nbits = 8 if n >= 256 * 39 else max(4, min(8, int(math.log2(max(n, 16) / 39))))
    return AnnChoice("ivfpq", {"nlist": nlist, "m": m, "nbits": nbits}, reason)


def build(vectors: np.ndarray, choice: AnnChoice, seed: int = 0) -> faiss.Index:
    """A filled faiss index over ``vectors`` (float32[N, D], unit rows); row i has id i."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if choice.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif choice.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, choice.params["M"], ip)
        index.hnsw.efConstruction = choice.params["efConstruction"]
    elif choice.kind in ("ivf", "ivfpq"):
        quantizer = faiss.IndexFlatIP(dim)
        p = choice.params
        index = (faiss.IndexIVFFlat(quantizer, dim, p["nlist"], ip) if choice.kind == "ivf"
                 else faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["m"], p["nbits"], ip))
        index.cp.seed = seed
        # k-means on a sample: 64 points per list is plenty and keeps 1M-vector builds in seconds
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=min(n, max(64 * p["nlist"], 256 * 64)), replace=False))]
        index.train(sample)  # (faiss's Python wrapper keeps `quantizer` alive with the index)
    else:
        raise SearchError(f"unknown index kind {choice.kind!r} (flat, hnsw, ivf, ivfpq)")
    index.add(x)
    return index


def search_param(kind: str) -> str | None:
    """Name of the search-time knob of an index kind (None for exact search)."""
    return {"hnsw": "efSearch", "ivf": "nprobe", "ivfpq": "nprobe"}.get(kind)


def set_search_param(index: faiss.Index, kind: str, value: int | None) -> None:
    """Apply ``efSearch`` / ``nprobe`` (kept in the metadata; set again after loading)."""
    if value is None:
        return
    if kind == "hnsw":
        index.hnsw.efSearch = int(value)
    elif kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(value)


def _ladder(kind: str, index: faiss.Index) -> list[int]:
    if kind == "hnsw":
        return [16, 32, 64, 128, 256, 512, 1024]
    nlist = faiss.extract_index_ivf(index).nlist
    return sorted({min(2 ** i, nlist) for i in range(0, 11)})


def exact_neighbors(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top ``k`` of each query (brute force)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top ``k`` that the index also returned in its top ``k``."""
    hits = [len(set(f[:k].tolist()) & set(e[:k].tolist()) - {-1}) for f, e in zip(found, exact)]
    return float(np.mean(hits) / k) if hits else 1.0


def tune(index: faiss.Index, kind: str, vectors: np.ndarray, query_sets: dict[str, np.ndarray],
         k: int = 10, target: float = TARGET_RECALL) -> dict[str, Any]:
    """Raise the search knob until every query set reaches ``target`` recall@k; measure it.

    Returns:
        ``{"param", "value", "recall@10": {set: r}, "target", "target_reached", "ladder": [...]}``;
        for exact search the recall is measured too (it must come out 1.0).
    """
    k = min(k, len(vectors))
    sets = {name: q for name, q in query_sets.items() if len(q)}
    exact = {name: exact_neighbors(vectors, q, k) for name, q in sets.items()}
    param = search_param(kind)
    ladder: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    for value in (_ladder(kind, index) if param else [None]):
        set_search_param(index, kind, value)
        t0 = time.perf_counter()
        recalls = {name: recall_at_k(index.search(np.ascontiguousarray(q), k)[1], exact[name], k)
                   for name, q in sets.items()}
        per_query_ms = 1e3 * (time.perf_counter() - t0) / max(1, sum(len(q) for q in sets.values()))
        step = {"value": value, "recall@10": recalls, "ms_per_query": round(per_query_ms, 4)}
        ladder.append(step)
        if all(r >= target for r in recalls.values()):
            chosen = step
            break
    chosen = chosen or ladder[-1]  # unreachable target: the best the ladder offers, said so below
    set_search_param(index, kind, chosen["value"])
    return {"param": param, "value": chosen["value"], "recall@10": chosen["recall@10"], "k": k,
            "target": target, "target_reached": all(r >= target for r in chosen["recall@10"].values()),
            "queries": {name: len(q) for name, q in sets.items()}, "ladder": ladder}


def single_query_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> float:
    """Median time of one query per call (how a person's query arrives), in milliseconds."""
    times = []
    for q in np.ascontiguousarray(queries, dtype=np.float32):
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)) if times else 0.0


@dataclass
class BuiltIndex:
    """A tuned index, the choice behind it and how it was reached."""

    index: faiss.Index
    choice: AnnChoice
    tuned: dict[str, Any]
    build_s: float
    tune_s: float


def build_tuned(vectors: np.ndarray, opts: AnnOptions, query_sets: dict[str, np.ndarray],
                latency_queries: int = 50) -> BuiltIndex:
    """Choose, build and tune an index; in ``auto`` mode keep exact search when it is as fast.

    Vectors without cluster structure (or a collection just above ``exact_max``) can need a
    knob so high that the approximate index scans as much as brute force, only slower. Then
    exact search is both faster and exact, and ``auto`` takes it if its vectors fit the
    memory budget; the reason and both latencies are recorded.
    """
    t0 = time.perf_counter()
    choice = choose(len(vectors), vectors.shape[1], opts)
    index = build(vectors, choice, seed=opts.seed)
    build_s = time.perf_counter() - t0
    tuned = tune(index, choice.kind, vectors, query_sets)
    fits = vectors.nbytes <= opts.memory_mb * 2**20
    if opts.kind == "auto" and choice.kind != "flat" and fits:
        probe = np.concatenate([q[:latency_queries] for q in query_sets.values() if len(q)])
        flat_choice = AnnChoice("flat", {}, "")
        flat = build(vectors, flat_choice)
        ann_ms, flat_ms = single_query_ms(index, probe), single_query_ms(flat, probe)
        if ann_ms >= flat_ms:
            flat_choice.reason = (f"{choice.kind} {choice.params} needed {tuned['param']}={tuned['value']} for "
                                  f"recall@10 {min(tuned['recall@10'].values()):.3f} and took {ann_ms:.2f} ms per "
                                  f"query vs {flat_ms:.2f} ms exact: exact search")
            choice, index = flat_choice, flat
            tuned = tune(index, "flat", vectors, query_sets)
        tuned["latency_ms"] = {"approximate": round(ann_ms, 3), "exact": round(flat_ms, 3)}
    return BuiltIndex(index, choice, tuned, build_s, time.perf_counter() - t0 - build_s)
