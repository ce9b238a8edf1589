"""results.json and the Markdown table (models as rows, as in CLIP-rsicd's README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval.benchmark import BenchmarkSpec


def table_metrics(spec: BenchmarkSpec) -> list[str]:
    """Metrics of a benchmark shown in the table: its ``table`` list or headline defaults."""
    if spec.table:
        return list(spec.table)
    out = []
    if "zeroshot" in spec.evaluators:
        out += ["acc1", "acc5"]
    if "retrieval" in spec.evaluators:
        out += ["mean_recall"]
    if "linear_probe" in spec.evaluators:
        out += ["linear_probe_acc1"]
    if "mlp_probe" in spec.evaluators:
        out += ["mlp_probe_acc1"]
    return out


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if metric.startswith("n_") or metric.endswith("_C"):
        return f"{value:g}"
    return f"{100 * value:.2f}"  # accuracies and recalls in percent


def markdown_table(rows: list[dict[str, Any]], specs: list[BenchmarkSpec]) -> str:
    """A Markdown table: one row per model, one column per (benchmark, metric); values in %.

    Args:
        rows: ``{"model": label, "results": {benchmark: {"status", "metrics"}}}`` per model.
        specs: the benchmarks, in column order.
    """
    cols = [(s.name, m) for s in specs for m in table_metrics(s)]
    head = "| model | " + " | ".join(f"{b} {m}" for b, m in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    lines = [head, sep]
    for row in rows:
        cells = []
        for b, m in cols:
            r = row["results"].get(b, {})
            cells.append(_fmt(m, r.get("metrics", {}).get(m)) if r.get("status") == "ok" else r.get("status", "n/a"))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, payload: dict[str, Any], table: str) -> tuple[Path, Path]:
    """Write results.json and results.md (atomically); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "results.json", out_dir / "results.md"
    for path, text in zip(paths, (json.dumps(payload, indent=2), table + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
