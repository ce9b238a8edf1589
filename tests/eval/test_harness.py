"""The eval harness end to end on toy models and hand-made shards (no open_clip)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from eval import api, benchmark, registry
from eval.cli import main
from eval.features import FeatureExtractor
from eval.loaders import DataUnavailable, load_split
from eval.runner import run_benchmark
from tests.eval.test_toys import NUM_CLASSES, ToyBundle, write_benchmark, write_shards
from train.core.configbase import ConfigError


@pytest.fixture
def toy_shards(tmp_path):
    return write_shards(tmp_path / "shards", {"train": 48, "test": 40})


def _metrics(bench_yaml, mode="perfect", **kw):
    spec = benchmark.load_benchmark(str(bench_yaml))
    ex = FeatureExtractor(ToyBundle(mode), "cpu", batch_size=16, progress=False)
    res = run_benchmark(spec, ex, **kw)
    assert res.status == "ok", res.message
    return res, ex


def test_perfect_toy_model_scores_one(toy_shards, tmp_path):
    bench = write_benchmark(tmp_path / "b.yaml", toy_shards,
                            evaluators={"zeroshot": {"ks": [1, 2, 4, 10]}, "retrieval": {"ks": [1, 5]}})
    res, _ = _metrics(bench, out_dir=tmp_path / "out")
    m = res.metrics
    for k in ("acc1", "acc2", "acc4", "acc10", "mean_per_class_recall", "weighted_f1",
              "image_retrieval_recall@1", "text_retrieval_recall@1", "mean_recall",
              "image_retrieval_recall@1_dedup", "text_retrieval_recall@1_dedup", "mean_recall_dedup"):
        assert m[k] == 1.0, k
    assert m["n_samples"] == 40 and m["n_texts"] == 80
    cm = json.loads((tmp_path / "out" / "confusion.json").read_text())
    assert cm["matrix"] == [[10 if i == j else 0 for j in range(4)] for i in range(4)]
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 1000
    # image->image by class: toy features share the class dimension -> the nearest other image
    # is always a same-class one
    assert m["image_image_recall@1"] == 1.0


def test_random_model_is_at_chance_and_constant_model_gets_nothing(tmp_path):
    shards = write_shards(tmp_path / "s", {"test": 400})
    bench = write_benchmark(tmp_path / "b.yaml", shards)
    rnd, _ = _metrics(bench, mode="random")
    assert abs(rnd.metrics["acc1"] - 1 / NUM_CLASSES) < 0.08
    assert abs(rnd.metrics["acc2"] - 2 / NUM_CLASSES) < 0.08
    const, _ = _metrics(bench, mode="constant")
    # all scores tie: ties count against the model, so only k >= #classes is a hit
    assert (const.metrics["acc1"], const.metrics["acc2"], const.metrics["acc4"]) == (0.0, 0.0, 1.0)
    assert const.metrics["acc10"] == 1.0


def test_features_are_computed_once_per_dataset_and_prompt_list(toy_shards, tmp_path):
    bench = write_benchmark(tmp_path / "b.yaml", toy_shards,
                            evaluators={"zeroshot": {}, "retrieval": {}})
    spec = benchmark.load_benchmark(str(bench))
    bundle = ToyBundle()
    bundle.model.train()
    ex = FeatureExtractor(bundle, "cpu", batch_size=16, progress=False)
    run_benchmark(spec, ex)
    assert ex.image_batches == math.ceil(40 / 16)  # zeroshot and retrieval shared one pass
    texts_after_first = ex.text_batches
    run_benchmark(spec, ex)
    assert ex.image_batches == math.ceil(40 / 16) and ex.text_batches == texts_after_first
    assert bundle.model.training  # evaluation hands the model back in train mode


def test_linear_and_mlp_probes(toy_shards, tmp_path):
    bench = write_benchmark(tmp_path / "b.yaml", toy_shards, evaluators={
        "linear_probe": {"train_split": "train", "c_grid": [0.01, 1.0, 100.0]},
        "mlp_probe": {"train_split": "train", "epochs": 200, "hidden": 16, "lr": 0.01}})
    res, _ = _metrics(bench)
    assert res.metrics["linear_probe_acc1"] == 1.0 and res.metrics["mlp_probe_acc1"] == 1.0
    assert res.metrics["linear_probe_C"] in (0.01, 1.0, 100.0)
    rnd1, _ = _metrics(bench, mode="random")
    rnd2, _ = _metrics(bench, mode="random")
    assert rnd1.metrics == rnd2.metrics  # seeded: deterministic
    assert rnd1.metrics["mlp_probe_acc1"] < 0.6  # noise features cannot be learned


def test_probe_refuses_to_train_on_the_test_split(toy_shards, tmp_path):
    bench = write_benchmark(tmp_path / "b.yaml", toy_shards, evaluators={"linear_probe": {"train_split": "test"}})
    spec = benchmark.load_benchmark(str(bench))
    res = run_benchmark(spec, FeatureExtractor(ToyBundle(), progress=False))
    assert res.status == "error" and "would test on training data" in res.message


def test_class_mapping_filters_and_max_samples(toy_shards, tmp_path):
    # a mapping that leaves class3 out: its samples are unlabelled and counted, not lost silently
    bench = write_benchmark(tmp_path / "b.yaml", toy_shards,
                            classes={"class0": "zero", "class1": "one", "class2": "two"})
    ds = load_split(benchmark.load_benchmark(str(bench)))
    assert ds.classnames == ["zero", "one", "two"]
    assert ds.excluded == {"class not in benchmark list: class3": 10}
    assert [ds.labels[i] for i in range(4)] == [0, 1, 2, None]
    spec = benchmark.load_benchmark(str(bench), {"max_samples": 8})
    sub = load_split(spec)
    assert len(sub) == 8 and sorted({y for y in sub.labels if y is not None}) == [0, 1, 2]
    # file-name protocol (RSICD-30): only files named after their class count
    bench2 = write_benchmark(tmp_path / "c.yaml", toy_shards, classes={"class0": "zero", "classX": "x"},
                             data={"filter": "filename_names_class"})
    ds2 = load_split(benchmark.load_benchmark(str(bench2)))
    assert ds2.labels[0] is None  # file "class0_0.png": the leading letters "class" do not name class0
    assert "file name names no class (RSICD-30 protocol)" in ds2.excluded


@pytest.mark.parametrize("name", benchmark.available())
def test_shipped_benchmarks_load(name):
    spec = benchmark.load_benchmark(name)
    assert spec.name == name and spec.sources, "every shipped benchmark says where its names come from"
    if "zeroshot" in spec.evaluators and spec.data.kind != "synthetic":
        assert spec.classnames and spec.templates


@pytest.mark.parametrize("bad, match", [
    ({"colour": 1}, "unknown config key 'colour'"),
    ({"data": {"kind": "shards", "path": "x", "splt": "val"}}, "data.splt"),
    ({"evaluators": {"zeroshot": {"k": [1]}}}, "evaluators.zeroshot.k"),
    ({"evaluators": {"nope": {}}}, "unknown evaluator 'nope'"),
    ({"templates": ["no placeholder"]}, "exactly one"),
    ({"data": {"kind": "karpathy", "path": "x.json"}}, "data.images"),
])
def test_bad_benchmark_definitions_are_rejected(tmp_path, bad, match):
    base = {"data": {"kind": "shards", "path": "x"}, "evaluators": {"zeroshot": {}}}
    base.update(bad)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=match):
        benchmark.load_benchmark(str(p))


def test_every_evaluator_is_registered():
    assert registry.names() == ["linear_probe", "mlp_probe", "retrieval", "zeroshot"]


def test_absent_data_is_skipped_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ORBITCLIP_DATA", str(tmp_path / "nowhere"))
    out = list(api.evaluate(ToyBundle(), ["eurosat"], "cpu"))
    assert out == []
    assert "skipping benchmark eurosat" in capsys.readouterr().err
    with pytest.raises(DataUnavailable):
        load_split(benchmark.load_benchmark("ucm_captions_val"))


def test_api_names_metrics_by_benchmark(toy_shards, tmp_path):
    bench = write_benchmark(tmp_path / "toy.yaml", toy_shards)
    out = dict(api.evaluate(ToyBundle(), [str(bench)], "cpu", out_dir=tmp_path / "o"))
    assert out["toy/acc1"] == 1.0 and out["toy/n_samples"] == 40
    assert (tmp_path / "o" / "toy" / "confusion.json").is_file()


def test_cli_reports_unknown_benchmark(capsys):
    assert main(["run", "--model", "x", "--benchmark", "no_such_benchmark", "--out", "/tmp/x"]) == 2
    assert "unknown benchmark 'no_such_benchmark'" in capsys.readouterr().err
