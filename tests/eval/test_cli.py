"""`python -m eval run` with real (tiny, random) open_clip models, and the shared data."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from eval import api, benchmark, clip_benchmark
from eval.cli import main
from eval.loaders import DataUnavailable, load_split


@pytest.fixture(scope="module")
def micro():
    from train.model.factory import load_model

    torch.manual_seed(0)
    return load_model("orbit-micro")


def test_cli_runs_models_and_writes_results(micro, tmp_path, capsys):
    ckpt = tmp_path / "micro.pt"
    torch.save({"state_dict": micro.model.state_dict()}, ckpt)
    expected = dict(api.evaluate(micro, ["demo"], "cpu", max_samples=40))
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"data": {"kind": "shards", "path": str(tmp_path / "absent")},
                                       "evaluators": {"retrieval": {}}}))
    out = tmp_path / "out"
    rc = main(["run", "--model", f"orbit-micro:{ckpt}", "--name", "micro-ckpt", "--model", "orbit-micro",
               "--benchmark", "demo", "--benchmark", str(missing), "--out", str(out),
               "--max-samples", "40", "--no-progress", "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [m["model"] for m in res["models"]] == ["micro-ckpt", "orbit-micro"]
    got = res["models"][0]["results"]["demo"]
    assert got["status"] == "ok"
    # the checkpoint file's weights were used: same numbers as evaluating the model directly
    assert {f"demo/{k}": v for k, v in got["metrics"].items()} == pytest.approx(expected)
    for k in ("acc1", "acc3", "acc5", "mean_per_class_recall", "weighted_f1", "mean_recall",
              "image_retrieval_recall@1", "text_retrieval_recall@10", "image_image_recall@1",
              "mean_recall_dedup", "image_retrieval_recall@1_dedup", "text_retrieval_recall@10_dedup"):
        assert 0.0 <= got["metrics"][k] <= 1.0, k
    # the demo's template captions repeat across images; dedup's right answers include the strict ones
    for k in ("mean_recall", "image_retrieval_recall@1", "text_retrieval_recall@1"):
        assert got["metrics"][f"{k}_dedup"] >= got["metrics"][k], k
    assert got["metrics"]["n_samples"] == 40
    skipped = res["models"][0]["results"]["missing"]
    assert skipped["status"] == "skipped" and "data not found" in skipped["message"]
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| model | demo acc1 |")
    assert "| demo mean_recall | demo mean_recall_dedup |" in table.splitlines()[0]
    assert "| micro-ckpt |" in table and "| orbit-micro |" in table and "skipped" in table
    # the legend under the table says what the strict and the dedup columns count
    assert "\n\nValues in %" in table
    assert "- `mean_recall`: mR" in table and "- `mean_recall_dedup`: mR" in table
    assert table.strip() in capsys.readouterr().out
    assert (out / "micro-ckpt" / "demo" / "confusion.png").is_file()
    assert got["figures"] == {name: str(out / "micro-ckpt" / "demo" / f"{name}.png")
                              for name in ("confusion", "retrieval_examples")}
    # CLIP_benchmark's layout: one file per (dataset, model, task), in a folder of their own
    cb_dir = out / "clip_benchmark"
    assert sorted(p.name for p in cb_dir.iterdir()) == sorted(
        clip_benchmark.file_name({"dataset": "demo", "pretrained": pretrained, "model": "orbit-micro",
                                  "language": "en", "task": task})
        for pretrained in (str(ckpt), "random-init") for task in ("zeroshot_classification", "zeroshot_retrieval"))
    zs_name = clip_benchmark.file_name({"dataset": "demo", "pretrained": str(ckpt), "model": "orbit-micro",
                                        "language": "en", "task": "zeroshot_classification"})
    zs = json.loads((cb_dir / zs_name).read_text())
    assert zs["pretrained"] == str(ckpt) and zs["metrics"]["acc1"] == got["metrics"]["acc1"]


def test_rsicd_val_on_shared_data(shared_data, micro, tmp_path, monkeypatch):
    monkeypatch.setenv("ORBITCLIP_CACHE", str(tmp_path / "cache"))
    ds = load_split(benchmark.load_benchmark("rsicd_val"))
    assert len(ds) == 200 and sum(map(len, ds.captions)) == 1000
    assert len(ds.classnames) == 30 and len(ds.labelled) == 190
    assert ds.excluded == {"class not in benchmark list: playfields": 10}
    out = dict(api.evaluate(micro, ["rsicd_val"], "cpu", max_samples=30))
    assert out["rsicd_val/n_images"] == 30 and out["rsicd_val/n_texts"] == 150
    assert 0 <= out["rsicd_val/acc1"] <= out["rsicd_val/acc5"] <= 1
    # held-out test splits are absent from the shared data: a clear skip, before any build
    for name in ("rsicd30", "rsicd_test", "ucm_captions_test"):
        with pytest.raises(DataUnavailable, match="split 'test' not in"):
            load_split(benchmark.load_benchmark(name))
    assert not any((tmp_path / "cache").glob("dataset-*"))  # nothing built for ucm_captions_test


@pytest.mark.slow
def test_eurosat_and_ucm_captions_build_from_shared_data(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ORBITCLIP_CACHE", str(tmp_path / "cache"))
    ucm = load_split(benchmark.load_benchmark("ucm_captions_val"))
    assert len(ucm) == 210 and all(len(c) == 5 for c in ucm.captions)
    spec = benchmark.load_benchmark("eurosat")
    val, train = load_split(spec), load_split(spec, "train")
    assert len(val) + len(train) == 4000 and 300 < len(val) < 500  # 10% hash split
    assert len(val.labelled) == len(val) and set(val.labels) == set(range(10))
    assert val.classnames[0] == "annual crop land" and not val.excluded
