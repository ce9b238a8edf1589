"""CLIP_benchmark result files (eval.clip_benchmark), checked against its schema and its own ``build``."""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest

from eval import clip_benchmark as cb

# The schema, from clip_benchmark/cli.py (LAION-AI/CLIP_benchmark 1.6.2): `eval` dumps these keys;
# `build` reads data["metrics"], data["model"] and data["pretrained"] of every *.json in a folder.
KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}


def _result(evaluators: dict[str, dict[str, float]], status: str = "ok") -> dict:
    """A BenchmarkResult as results.json stores it."""
    metrics = {k: v for ms in evaluators.values() for k, v in ms.items()}
    return {"status": status, "metrics": metrics, "evaluators": {e: list(ms) for e, ms in evaluators.items()}}


ROWS = [
    {"spec": "orbit-tiny", "arch": "orbit-tiny", "results": {
        "eurosat": _result({"zeroshot": {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.45},
                            "linear_probe": {"linear_probe_acc1": 0.7, "linear_probe_mean_per_class_recall": 0.6,
                                             "linear_probe_C": 100.0}}),
        "ucm_captions_val": _result({"retrieval": {"image_retrieval_recall@1": 0.1, "text_retrieval_recall@1": 0.2,
                                                   "mean_recall": 0.15}}),
        "rsicd30": _result({}, status="skipped")}},
    {"spec": "orbit-tiny:runs/a/demo/model.pt", "arch": "orbit-tiny", "results": {
        "eurosat": _result({"zeroshot": {"acc1": 0.8}, "mlp_probe": {"mlp_probe_acc1": 0.85}})}},
]


def test_files_follow_clip_benchmark_layout_and_keys(tmp_path):
    paths = cb.write_files(tmp_path, ROWS)
    assert sorted(p.name for p in paths) == sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "eurosat_random-init_orbit-tiny_en_zeroshot_classification.json",
        "eurosat_random-init_orbit-tiny_en_linear_probe.json",
        "ucm_captions_val_random-init_orbit-tiny_en_zeroshot_retrieval.json",
        "eurosat_runs_a_demo_model.pt_orbit-tiny_en_zeroshot_classification.json",
        "eurosat_runs_a_demo_model.pt_orbit-tiny_en_mlp_probe.json",
    ])  # rsicd30 was skipped: no file (its status is in results.json)
    lp = json.loads((tmp_path / "eurosat_random-init_orbit-tiny_en_linear_probe.json").read_text())
    assert set(lp) == KEYS
    assert lp == {"dataset": "eurosat", "model": "orbit-tiny", "pretrained": "random-init", "task": "linear_probe",
                  "metrics": {"lp_acc1": 0.7, "lp_mean_per_class_recall": 0.6, "lp_C": 100.0}, "language": "en"}
    zs = json.loads((tmp_path / "eurosat_runs_a_demo_model.pt_orbit-tiny_en_zeroshot_classification.json").read_text())
    assert zs["pretrained"] == "runs/a/demo/model.pt" and zs["metrics"] == {"acc1": 0.8}


def test_the_same_model_twice_keeps_both_files(tmp_path):
    paths = cb.write_files(tmp_path, [ROWS[1], ROWS[1]])
    assert len(paths) == len(set(paths)) == 4
    assert (tmp_path / "eurosat_runs_a_demo_model.pt_orbit-tiny_en_mlp_probe--2.json").is_file()


def test_pretrained_names_our_model_specs(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    assert cb.pretrained_name("orbit-tiny") == "random-init"
    assert cb.pretrained_name("ViT-B-32:openai") == "openai"
    assert cb.pretrained_name("orbit-tiny:/ckpts/step_10.pt") == "/ckpts/step_10.pt"
    assert cb.pretrained_name(str(run)) == str(run)
    assert cb.pretrained_name("local-dir:/exports/x") == "local-dir:/exports/x"
    assert cb.file_name({"dataset": "d", "pretrained": "local-dir:/exports/x", "model": "local-dir:/exports/x",
                         "language": "en", "task": "t"}) == "d_exports_x_local-dir_exports_x_en_t.json"


def _clip_benchmark_build():
    """``main_build`` of the installed CLIP_benchmark package, or a skip.

    Importing ``clip_benchmark.cli`` pulls in its dataset and captioning modules (requests,
    pycocoevalcap, torchvision datasets), which this environment does not have; ``build``
    itself needs only json, os and csv, so its function is compiled from the package's file.
    """
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or spec.origin is None:
        pytest.skip("clip_benchmark is not installed (pip install --no-deps clip_benchmark)")
    path = Path(spec.origin).with_name("cli.py")
    tree = ast.parse(path.read_text(), str(path))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main_build")
    namespace = {"json": json, "os": os, "csv": csv}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["main_build"]


def test_clip_benchmark_build_merges_our_folder(tmp_path):
    main_build = _clip_benchmark_build()
    cb.write_files(tmp_path / "clip_benchmark", ROWS)
    out = tmp_path / "benchmark.csv"
    main_build(argparse.Namespace(files=[str(tmp_path / "clip_benchmark")], output=str(out)))
    with out.open() as f:
        rows = {(r["dataset"], r["task"], r["model_fullname"]): r for r in csv.DictReader(f)}
    assert len(rows) == 5
    lp = rows[("eurosat", "linear_probe", "orbit-tiny random-init")]
    assert float(lp["lp_acc1"]) == 0.7 and lp["language"] == "en"
    assert float(rows[("ucm_captions_val", "zeroshot_retrieval", "orbit-tiny random-init")]
                 ["image_retrieval_recall@1"]) == 0.1
    assert float(rows[("eurosat", "zeroshot_classification", "orbit-tiny runs/a/demo/model.pt")]["acc1"]) == 0.8
