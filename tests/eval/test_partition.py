"""Evaluation shared across ranks (eval.features.Partition): threads in-process, then real gloo."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest
import torch

from eval import api, benchmark
from eval.features import FeatureExtractor, shard_bounds
from eval.loaders import load_split
from tests.distutil import run_distributed
from tests.eval.test_toys import ToyBundle, toy_transform, write_benchmark, write_shards


class ThreadPartition:
    """A world of threads: ``gather_rows`` is a real collective (every rank waits for all)."""

    def __init__(self, exchange: dict[str, Any], rank: int, world: int) -> None:
        self.exchange, self.rank, self.world = exchange, rank, world
        self.calls = 0

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        slots, barrier = self.exchange["slots"], self.exchange["barrier"]
        slots[self.rank] = local.clone()
        barrier.wait()
        out = torch.cat(slots)
        barrier.wait()  # nobody refills a slot before every rank has read them all
        self.calls += 1
        return out


def run_ranks(world: int, fn: Callable[[ThreadPartition], Any]) -> list[Any]:
    """``fn(partition)`` on ``world`` threads at once; results (or exceptions) in rank order."""
    exchange = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=20)}
    parts = [ThreadPartition(exchange, r, world) for r in range(world)]

    def call(p: ThreadPartition) -> Any:
        try:
            return fn(p)
        except Exception as e:  # returned so that the test can look at every rank's outcome
            return e

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(call, parts))


def test_shard_bounds_are_contiguous_and_balanced():
    for n, world in [(10, 3), (2, 3), (0, 2), (7, 1)]:
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


@pytest.mark.parametrize("n, world", [(37, 2), (37, 3), (2, 3)])
def test_partitioned_features_equal_single_process(tmp_path, n, world):
    ds = load_split(benchmark.load_benchmark(str(write_benchmark(
        tmp_path / "b.yaml", write_shards(tmp_path / "s", {"test": n})))))
    single = FeatureExtractor(ToyBundle(), batch_size=4, progress=False).image_features(ds)

    def rank_features(part: ThreadPartition) -> tuple[torch.Tensor, int, int]:
        ex = FeatureExtractor(ToyBundle(), batch_size=4, progress=False, partition=part)
        feats = ex.image_features(ds)
        assert ex.image_features(ds) is feats  # cached: no second collective
        return feats, ex.image_batches, part.calls

    results = run_ranks(world, rank_features)
    for rank, (feats, batches, calls) in enumerate(results):
        assert torch.equal(feats, single)
        start, stop = shard_bounds(n, rank, world)
        assert batches == math.ceil((stop - start) / 4)  # this rank encoded its share only
        assert calls == 2  # the same number of collectives on every rank


def test_a_rank_failing_alone_fails_every_rank_without_a_hang(tmp_path):
    ds = load_split(benchmark.load_benchmark(str(write_benchmark(
        tmp_path / "b.yaml", write_shards(tmp_path / "s", {"test": 8})))))

    def broken_on_item_6(im):
        if im.getpixel((0, 0))[1] == 6:  # pixel G = item id: item 6 is in rank 1's half
            raise OSError("truncated image")
        return toy_transform(im)

    def run(part: ThreadPartition) -> torch.Tensor:
        bundle = ToyBundle()
        bundle.eval_transform = broken_on_item_6
        return FeatureExtractor(bundle, batch_size=4, progress=False, partition=part).image_features(ds)

    r0, r1 = run_ranks(2, run)
    assert isinstance(r1, OSError) and "truncated image" in str(r1)
    assert isinstance(r0, RuntimeError) and "image encoding failed on rank(s) [1]" in str(r0)


def test_partitioned_evaluate_matches_single_process_and_only_the_writer_writes(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": 24, "test": 21})
    bench = str(write_benchmark(tmp_path / "toy.yaml", shards, evaluators={
        "zeroshot": {"ks": [1, 2]}, "retrieval": {"ks": [1, 5]},
        "linear_probe": {"train_split": "train", "c_grid": [1.0]}}))
    single = dict(api.evaluate(ToyBundle("perfect"), [bench], batch_size=4))

    def rank_eval(part: ThreadPartition) -> tuple[dict[str, float], dict]:
        figures: dict = {}
        out = dict(api.evaluate(ToyBundle("perfect"), [bench], out_dir=tmp_path / f"out{part.rank}",
                                batch_size=4, partition=part, write=part.rank == 0, figures=figures))
        return out, figures

    (m0, f0), (m1, f1) = run_ranks(2, rank_eval)
    assert m0 == m1 == single and "toy/linear_probe_acc1" in single
    assert set(f0) == {"toy/confusion", "toy/retrieval_examples"} and f1 == {}
    assert (tmp_path / "out0" / "toy" / "confusion.json").is_file() and not (tmp_path / "out1").exists()


class GlooPartition:
    """A test-only Partition over torch.distributed (pads to the largest share, then trims)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.rank, self.world = dist, dist.get_rank(), dist.get_world_size()

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        self.dist.all_gather(sizes, torch.tensor([local.shape[0]]))
        padded = torch.zeros(int(max(sizes)), local.shape[1])
        padded[:len(local)] = local
        rows = [torch.empty_like(padded) for _ in range(self.world)]
        self.dist.all_gather(rows, padded)
        return torch.cat([r[:int(s)] for r, s in zip(rows, sizes)])


def _gloo_evaluate(rank: int, world: int, max_samples: int) -> tuple[dict[str, float], int]:
    """One rank: evaluate orbit-micro on the demo benchmark; (metrics, images this rank encoded)."""
    from train.api import load_model

    bundle = load_model("orbit-micro")  # seeded: the same weights on every rank
    encode, encoded = bundle.model.encode_image, []
    bundle.model.encode_image = lambda x, **kw: (encoded.append(len(x)), encode(x, **kw))[1]
    out = dict(api.evaluate(bundle, ["demo"], max_samples=max_samples, batch_size=5, partition=GlooPartition(),
                            write=rank == 0))
    return out, sum(encoded)


@pytest.mark.slow
def test_gloo_two_ranks_give_the_one_process_metrics():
    from train.api import load_model

    # 5-image batches on both sides: every image goes through the same batch shape, so
    # the fp32 features (and hence the metrics) are bit-identical, not merely close
    expected = dict(api.evaluate(load_model("orbit-micro"), ["demo"], max_samples=20, batch_size=5))
    (r0, n0), (r1, n1) = run_distributed(_gloo_evaluate, 2, 20)
    assert r0 == r1 == expected
    assert expected["demo/n_samples"] == 20 and "demo/image_retrieval_recall@1" in expected
    assert n0 == n1 == 10  # each rank encoded its half of the 20 images, once for both evaluators
