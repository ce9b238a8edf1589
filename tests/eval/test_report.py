"""eval.report: the Markdown table and the legend printed under it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from eval.benchmark import available, load_benchmark
from eval.report import describe, legend, markdown_table, table_metrics


def _row(model: str, metrics: dict[str, float]) -> dict:
    return {"model": model, "results": {"demo": {"status": "ok", "metrics": metrics}}}


def test_demo_table_shows_strict_and_dedup_mean_recall_with_a_legend():
    spec = load_benchmark("demo")
    assert table_metrics(spec) == ["acc1", "mean_per_class_recall", "mean_recall", "mean_recall_dedup"]
    table = markdown_table([_row("trained", {"acc1": 0.5, "mean_per_class_recall": 0.25, "mean_recall": 0.125,
                                             "mean_recall_dedup": 0.75})], [spec])
    assert table.splitlines() == [
        "| model | demo acc1 | demo mean_per_class_recall | demo mean_recall | demo mean_recall_dedup |",
        "|---|---:|---:|---:|---:|",
        "| trained | 50.00 | 25.00 | 12.50 | 75.00 |"]
    lines = legend([spec]).splitlines()
    assert lines[0].startswith("Values in %")
    assert [line.split("`")[1] for line in lines[1:]] == table_metrics(spec)  # one line per column, in order
    assert "recall@1/5/10" in lines[3] and "own captions" in lines[3]
    assert "identical word for word" in lines[4]


@pytest.mark.parametrize("name", available())
def test_every_column_of_a_shipped_benchmark_table_is_explained(name):
    spec = load_benchmark(name)
    for metric in table_metrics(spec):
        assert describe(metric, spec), f"{name}: no legend for {metric} (add it to eval.report._LEGEND)"


def test_dedup_descriptions_name_their_k_and_differ_from_the_strict_ones():
    spec = load_benchmark("demo")
    assert "top 5" in describe("image_retrieval_recall@5_dedup", spec)
    assert "copy" in describe("text_retrieval_recall@1_dedup", spec)
    assert describe("text_retrieval_recall@1_dedup", spec) != describe("text_retrieval_recall@1", spec)
    assert describe("no_such_metric", spec) is None


def test_a_name_meaning_other_k_in_another_benchmark_gets_its_own_line():
    demo = load_benchmark("demo")
    other = dataclasses.replace(demo, name="other", evaluators={"retrieval": {"ks": [1, 2]}}, table=["mean_recall"])
    lines = legend([demo, other]).splitlines()
    assert any(line.startswith("- `mean_recall`:") and "recall@1/5/10" in line for line in lines)
    assert any(line.startswith("- `other mean_recall`:") and "recall@1/2;" in line for line in lines)
    assert legend([demo, demo]) == legend([demo])  # the same meaning twice: one line
    assert legend([demo, other, other]) == legend([demo, other])


def test_readme_metric_table_names_every_retrieval_metric():
    import re

    import torch

    from eval.evaluators.retrieval import text_ids, text_image_recalls

    readme = Path(__file__).resolve().parents[2] / "README.md"
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| `")]
    documented = {name for line in rows for name in re.findall(r"`([^`]+)`", line.split("|")[1])}
    names = text_image_recalls(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), [1, 5],
                               ids=text_ids(["a", "a"]))
    for name in names:
        assert re.sub(r"@\d+", "@k", name) in documented, f"README's metric table lacks {name}"


def test_legend_is_empty_for_columns_it_does_not_know():
    spec = dataclasses.replace(load_benchmark("demo"), table=["n_images"])
    assert legend([spec]) == ""
