"""Results as CLIP_benchmark files, so that its ``clip_benchmark build`` merges ours with its own.

What CLIP_benchmark writes and reads (``clip_benchmark/cli.py`` of LAION-AI/CLIP_benchmark,
release 1.6.2): ``eval`` dumps one JSON per (dataset, model, pretrained, language, task),
``{"dataset", "model", "pretrained", "task", "metrics": {name: value}, "language"}``, to
``{dataset}_{pretrained}_{model}_{language}_{task}.json`` (its default ``--output``; a
pretrained file enters the name without its folders). ``build FILE_OR_DIR ...`` reads
every ``*.json`` of a folder, makes one CSV row per file from ``metrics`` plus the other
keys, and adds ``model_fullname = model + " " + pretrained``. Hence our files get a
folder of their own (``OUT/clip_benchmark/``), and a later run into the same ``OUT``
replaces the files of the same (dataset, model, pretrained, task), as CLIP_benchmark's do.

Mapping: each of our evaluators is one CLIP_benchmark task; a benchmark's name is the
``dataset``; the model's architecture is ``model``; its spec gives ``pretrained``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

LANGUAGE = "en"
"""Our class names, templates and captions are English."""

RANDOM_INIT = "random-init"
"""``pretrained`` of a model given as a bare architecture (random weights, seed 0)."""

TASKS: dict[str, tuple[str, str, str]] = {
    "zeroshot": ("zeroshot_classification", "", ""),
    "retrieval": ("zeroshot_retrieval", "", ""),
    # CLIP_benchmark names its linear-probe metrics lp_acc1, lp_mean_per_class_recall, ...
    "linear_probe": ("linear_probe", "linear_probe_", "lp_"),
    # no CLIP_benchmark counterpart; written under its own task name so that nothing is lost
    "mlp_probe": ("mlp_probe", "", ""),
}
"""Our evaluator -> (CLIP_benchmark task, our metric-name prefix, its prefix)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]+")


def pretrained_name(spec: str) -> str:
    """CLIP_benchmark's ``pretrained`` for one of our model specs (see ``train.api.load_model``).

    ``ARCH:TAG_OR_FILE`` -> the tag or file; ``local-dir:DIR`` / ``hf:DIR`` -> the spec;
    a run directory or checkpoint of ours -> its path as given; ``ARCH`` -> ``random-init``.
    """
    if spec.startswith(("local-dir:", "hf:")) or Path(spec).exists():
        return spec
    _, sep, weights = spec.partition(":")
    return weights if sep else RANDOM_INIT


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "none"


def file_name(record: dict[str, Any]) -> str:
    """``{dataset}_{pretrained}_{model}_{language}_{task}.json`` with ``/`` (and other characters
    unsafe in file names) as ``_``: a pretrained path enters whole, like CLIP_benchmark's
    ``{pretrained_full_path}``, so that two runs called ``demo`` in different folders do not collide."""
    pretrained = record["pretrained"].split(":", 1)[-1] if record["pretrained"].startswith(("local-dir:", "hf:")) \
        else record["pretrained"]
    parts = (record["dataset"], pretrained, record["model"], record["language"], record["task"])
    return "_".join(_slug(p) for p in parts) + ".json"


def records(dataset: str, model: str, pretrained: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """CLIP_benchmark dumps of one (model, benchmark) result: one per evaluator that reported metrics.

    Args:
        dataset: the benchmark's name.
        model: the architecture.
        pretrained: see :func:`pretrained_name`.
        result: an ``ok`` :class:`eval.runner.BenchmarkResult` as a dict (``metrics``, ``evaluators``).
    """
    out = []
    for evaluator, names in result["evaluators"].items():
        if not names:
            continue
        task, ours, theirs = TASKS.get(evaluator, (evaluator, "", ""))
        metrics = {theirs + n[len(ours):] if ours and n.startswith(ours) else n: result["metrics"][n] for n in names}
        out.append({"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
                    "metrics": metrics, "language": LANGUAGE})
    return out


def write_files(out_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write the CLIP_benchmark files of ``eval run``'s model rows into ``out_dir``; returns their paths.

    Args:
        rows: ``{"spec", "arch", "results": {benchmark: result dict}}`` per model; only
            ``ok`` results are written (skipped and failed ones are in results.json).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for row in rows:
        pretrained = pretrained_name(row["spec"])
        for benchmark, result in row["results"].items():
            if result.get("status") != "ok":
                continue
            for rec in records(benchmark, row["arch"] or row["spec"], pretrained, result):
                stem = file_name(rec).removesuffix(".json")
                path, n = out_dir / f"{stem}.json", 2
                while path in written:  # the same model listed twice (e.g. under two --name): keep both
                    path, n = out_dir / f"{stem}--{n}.json", n + 1
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(rec, indent=2))
                tmp.replace(path)
                written.append(path)
    return written
