"""results.json and the Markdown table (models as rows, as in CLIP-rsicd's README)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from eval import registry
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


_LEGEND: list[tuple[str, str]] = [
    (r"acc1", "zero-shot: images whose class prompt scores highest."),
    (r"acc(\d+)", "zero-shot: images whose class is among the {0} best-scoring prompts."),
    (r"mean_per_class_recall", "zero-shot top-1 accuracy averaged over classes."),
    (r"weighted_f1", "zero-shot F1 per class, averaged weighted by class size."),
    (r"image_retrieval_recall@(\d+)", "text->image: captions whose own image is in the top {0}."),
    (r"text_retrieval_recall@(\d+)", "image->text: images with one of their own captions in the top {0}."),
    (r"mean_recall", "mR: mean of the text->image and image->text recall@{ks}; only an image's own captions count."),
    (r"image_retrieval_recall@(\d+)_dedup",
     "text->image: captions with, in the top {0}, an image that has this exact caption (its own or a copy)."),
    (r"text_retrieval_recall@(\d+)_dedup",
     "image->text: images with, in the top {0}, a caption identical to one of their own (another image's copy counts)."),
    (r"mean_recall_dedup",
     "mR (mean of both directions' recall@{ks}) where a caption identical word for word to a right one "
     "(another image's copy) counts as right too."),
    (r"image_image_recall@(\d+)", "image->image: images with another image of their class in the top {0}."),
    (r"(linear|mlp)_probe_acc1", "{0} probe trained on frozen image features: top-1 accuracy."),
    (r"(linear|mlp)_probe_mean_per_class_recall", "{0} probe: top-1 accuracy averaged over classes."),
]
"""(full-match pattern, description): groups fill ``{0}``; ``{ks}`` is the benchmark's retrieval k."""


def describe(metric: str, spec: BenchmarkSpec) -> str | None:
    """One sentence on what a table metric counts, or None for a name this module does not know."""
    for pattern, text in _LEGEND:
        m = re.fullmatch(pattern, metric)
        if m:
            ks = "/".join(map(str, _retrieval_ks(spec)))
            return text.format(*m.groups(), ks=ks)
    return None


def _retrieval_ks(spec: BenchmarkSpec) -> list[int]:
    opts = spec.evaluators.get("retrieval")
    return registry.parse_options("retrieval", opts).ks if opts is not None else []


def legend(specs: list[BenchmarkSpec]) -> str:
    """Lines under the table that say what each column counts ("" when none is known)."""
    lines, first, told = [], {}, set()
    for spec in specs:
        for metric in table_metrics(spec):
            text = describe(metric, spec)
            if text is None or (metric, text) in told:
                continue
            # the same name with another meaning (other k) is told apart by its benchmark
            label = metric if first.setdefault(metric, text) == text else f"{spec.name} {metric}"
            told.add((metric, text))
            lines.append(f"- `{label}`: {text}")
    if not lines:
        return ""
    return "\n".join(["Values in %; ties count against the model. Columns:"] + lines)


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
