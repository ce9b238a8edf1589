"""Pictures written by the evaluators: they exist, are valid PNGs, and are reported."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from eval import api, benchmark
from eval.evaluators.retrieval import caption_owners, retrieval_examples
from eval.features import FeatureExtractor
from eval.loaders import load_split
from eval.runner import run_benchmark
from tests.eval.test_toys import ToyBundle, write_benchmark, write_shards


@pytest.fixture
def toy_bench(tmp_path):
    shards = write_shards(tmp_path / "s", {"test": 24})
    return write_benchmark(tmp_path / "toy.yaml", shards, evaluators={
        "zeroshot": {"ks": [1, 2]}, "retrieval": {"ks": [1, 5], "examples": 3, "examples_k": 4}})


def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def test_evaluate_reports_every_picture_it_writes(toy_bench, tmp_path):
    figures: dict = {}
    metrics = dict(api.evaluate(ToyBundle(), [str(toy_bench)], out_dir=tmp_path / "out", figures=figures))
    assert metrics["toy/acc1"] == 1.0
    assert figures == {"toy/confusion": tmp_path / "out" / "toy" / "confusion.png",
                       "toy/retrieval_examples": tmp_path / "out" / "toy" / "retrieval_examples.png"}
    width, height = _valid_png(figures["toy/retrieval_examples"])
    assert width > 400 and height > 300  # 3 rows of 1 text + 4 images
    _valid_png(figures["toy/confusion"])
    assert sorted(p.name for p in (tmp_path / "out" / "toy").iterdir()) == [
        "confusion.json", "confusion.png", "retrieval_examples.png"]


def test_results_list_figures_and_which_evaluator_gave_which_metric(toy_bench, tmp_path):
    spec = benchmark.load_benchmark(str(toy_bench))
    res = run_benchmark(spec, FeatureExtractor(ToyBundle(), progress=False), tmp_path / "o")
    assert res.status == "ok"
    assert res.figures == {"confusion": str(tmp_path / "o" / "confusion.png"),
                           "retrieval_examples": str(tmp_path / "o" / "retrieval_examples.png")}
    assert res.evaluators["zeroshot"] == ["acc1", "acc2", "mean_per_class_recall", "weighted_f1", "n_samples"]
    assert "image_retrieval_recall@5" in res.evaluators["retrieval"]
    assert sorted(m for ms in res.evaluators.values() for m in ms) == sorted(res.metrics)
    # no output folder: no pictures, none reported
    res = run_benchmark(spec, FeatureExtractor(ToyBundle(), progress=False))
    assert res.status == "ok" and res.figures == {}


def test_retrieval_examples_mark_the_correct_image(toy_bench):
    ds = load_split(benchmark.load_benchmark(str(toy_bench)))
    texts, owners, _ = caption_owners(ds.captions)
    ex = FeatureExtractor(ToyBundle(), progress=False)
    good = retrieval_examples(ex.image_features(ds), ex.text_features(texts), owners, texts, n=3, k=4)
    assert [e.query for e in good] == [texts[0], texts[16], texts[32]]  # evenly spaced over 48 captions
    for e in good:  # the toy model finds each caption's own image first
        assert e.rank == 0 and e.correct == [True, False, False, False]
        assert e.images[0] == int(owners[texts.index(e.query)]) and e.scores == sorted(e.scores, reverse=True)
    # ties go against the correct image, as in the metrics: its position is its rank
    feats = torch.eye(4)
    tied = retrieval_examples(feats, feats[[3]], torch.tensor([0]), ["q"], n=1, k=4)[0]
    assert tied.images == [3, 1, 2, 0] and tied.rank == 3 and tied.correct == [False, False, False, True]
    assert retrieval_examples(feats, feats[[3]], torch.tensor([0]), ["q"], n=1, k=2)[0].correct == [False, False]
