"""ANN index of ``search``: build time, query latency p50/p99 and recall@10 at 10k / 100k / 1M vectors.

    python -m benchmarks.search_ann                       # 10k, 100k, 1M x 128 dims (orbit-tiny's)
    python -m benchmarks.search_ann --sizes 2000 --dim 16 --queries 50      # seconds (smoke test)

For each size the index that ``search index`` builds (``--index auto``, default options) is
built from random unit vectors by the same function (:func:`search.ann.build_tuned`): its
search knob is tuned to recall@10 >= 0.95 on 500 tuning queries (or the ladder's end), and
exact search is kept when the tuned index is no faster. It is then measured on *other*
queries: recall@10 against exact search and single-query latency (one query per call,
k = 10, the way a person's query arrives). A forced row shows the other side (exact search
next to a kept approximate index, the approximate index next to a fallback to exact), and
an ``ivfpq`` row the memory-budget mode.

Two distributions: ``uniform`` unit vectors are the worst case for any ANN (no cluster
structure; every neighbour is nearly as far as any other) and ``clustered`` ones (points
around 1,000 centres) are closer to what real embeddings look like.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.report import cpu_model, write_report
from search import ann
from search.options import AnnOptions

ROOT = Path(__file__).resolve().parent.parent


def vectors(n: int, dim: int, kind: str, seed: int) -> np.ndarray:
    """``n`` unit vectors: ``uniform`` on the sphere, or ``clustered`` around 1,000 centres."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centres = np.random.default_rng(12345).standard_normal((1000, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32) * (
            0.6 / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def latency_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    """p50 and p99 of single-query search time."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append(1e3 * (time.perf_counter() - t0))
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def measure(x: np.ndarray, opts: AnnOptions, tune_q: np.ndarray, test_q: np.ndarray, truth: np.ndarray) -> dict:
    """Build and tune as ``search index`` does (on ``tune_q``), then measure on ``test_q``."""
    built = ann.build_tuned(x, opts, {"tune": tune_q})
    recall = ann.recall_at_k(built.index.search(test_q, 10)[1], truth)
    p50, p99 = latency_ms(built.index, test_q)
    tuned, choice = built.tuned, built.choice
    knob = f"{tuned['param']}={tuned['value']}" if tuned["param"] else "-"
    params = " ".join(f"{k}={v}" for k, v in choice.params.items()) or "-"
    return {"index": choice.kind, "params": params, "knob": knob, "build_s": round(built.build_s, 2),
            "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "recall@10": round(recall, 4),
            "index_mib": round(faiss.serialize_index(built.index).nbytes / 2**20, 1),
            "why": {"reason": choice.reason, "latency_ms": tuned.get("latency_ms")}}  # JSON only (a dict)


def run(sizes: list[int], dim: int, distributions: list[str], queries: int, pq_budget_mb: float,
        exact_max: int) -> list[dict]:
    """For each distribution and size: the auto index, the approximate one by size when auto kept
    exact search, exact search when auto did not, and IVF-PQ under a small memory budget."""
    rows = []
    for dist in distributions:
        for n in sizes:
            x = vectors(n, dim, dist, seed=n)
            q = vectors(2 * queries, dim, dist, seed=n + 1)  # not in the index
            tune_q, test_q = q[:queries], q[queries:]
            truth = ann.exact_neighbors(x, test_q, 10)

            def row(label: str, opts: AnnOptions) -> dict:
                r = {"vectors": dist, "n": n, "dim": dim, "choice": label, **measure(x, opts, tune_q, test_q, truth)}
                print(f"[search_ann] {r}", flush=True)
                rows.append(r)
                return r

            auto = row("auto", AnnOptions(exact_max=exact_max))
            by_size = ann.choose(n, dim, AnnOptions(exact_max=exact_max)).kind
            if auto["index"] == "flat" and by_size != "flat":
                row(f"{by_size} (forced)", AnnOptions(kind=by_size))
            elif auto["index"] != "flat":
                row("exact (forced)", AnnOptions(kind="flat"))
            if n > exact_max:
                row(f"ivfpq, {pq_budget_mb:g} MiB budget", AnnOptions(kind="ivfpq", memory_mb=pq_budget_mb))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search_ann", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128, help="embedding size (orbit-tiny: 128; ViT-B/32: 512)")
    p.add_argument("--distributions", nargs="+", choices=["uniform", "clustered"], default=["uniform", "clustered"])
    p.add_argument("--queries", type=int, default=500, help="tuning queries, and as many test queries")
    p.add_argument("--pq-budget-mb", type=float, default=64.0, help="memory budget of the IVF-PQ row")
    p.add_argument("--exact-max", type=int, default=AnnOptions.exact_max, help="as for search index")
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "search_ann.json"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(a.sizes, a.dim, a.distributions, a.queries, a.pq_budget_mb, a.exact_max)
    write_report(a.out, "search_ann", rows, cpu_model=cpu_model(), faiss=faiss.__version__,
                 faiss_threads=faiss.omp_get_max_threads(), queries=a.queries, target_recall=ann.TARGET_RECALL,
                 seconds=round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
