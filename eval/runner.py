"""Evaluate one model on one benchmark: the single code path of the CLI and the trainer."""

from __future__ import annotations

import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from eval import registry
from eval.benchmark import BenchmarkSpec
from eval.context import EvalContext
from eval.dataset import EvalDataset
from eval.features import FeatureExtractor
from eval.loaders import DataUnavailable, load_split
from eval.registry import Metric

# Loaded splits are model-independent: keep a few so that periodic evaluation during
# training and multi-model CLI runs read and decode each split's shards only once.
_DATASETS: OrderedDict[str, EvalDataset] = OrderedDict()
_MAX_DATASETS = 16


def load_cached(spec: BenchmarkSpec, split: str | None = None) -> EvalDataset:
    """:func:`eval.loaders.load_split` with a small in-process cache."""
    key = repr((spec.name, spec.data, spec.classes, spec.templates, split))
    if key in _DATASETS:
        _DATASETS.move_to_end(key)
        return _DATASETS[key]
    ds = load_split(spec, split)
    _DATASETS[key] = ds
    while len(_DATASETS) > _MAX_DATASETS:
        _DATASETS.popitem(last=False)
    return ds


@dataclass
class BenchmarkResult:
    """The outcome of one (model, benchmark) pair, as stored in results.json."""

    benchmark: str
    status: Literal["ok", "skipped", "error"]
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    seconds: float = 0.0
    evaluators: dict[str, list[str]] = field(default_factory=dict)
    """Evaluator name -> the metrics it reported (task of each metric, e.g. for CLIP_benchmark files)."""
    figures: dict[str, str] = field(default_factory=dict)
    """Picture name -> PNG path written by the evaluators (none without an output folder)."""


def iter_benchmark(spec: BenchmarkSpec, extractor: FeatureExtractor, out_dir: Path | None = None,
                   record: BenchmarkResult | None = None) -> Iterator[Metric]:
    """Run every evaluator of ``spec``; yields ``(metric, value)``.

    Args:
        record: filled as the evaluators run with ``info``, ``evaluators`` and ``figures``
            (``metrics`` is left to the caller).

    Raises:
        DataUnavailable: the benchmark's data is not on this machine.
    """
    record = record if record is not None else BenchmarkResult(spec.name, "ok")
    ds = load_cached(spec)
    ctx = EvalContext(spec=spec, dataset=ds, extractor=extractor,
                      load_split=lambda split: load_cached(spec, split), out_dir=out_dir, info=record.info)
    if ds.excluded:
        ctx.info["excluded"] = dict(ds.excluded)
    ctx.info["n_split_samples"] = len(ds)
    for name, options in spec.evaluators.items():
        ev = registry.get(name)
        reported = record.evaluators.setdefault(name, [])
        try:
            for metric, value in ev.fn(ctx, registry.parse_options(name, options)):
                reported.append(metric)
                yield metric, value
        finally:  # pictures written before a failure are still reported
            record.figures.update({k: str(v) for k, v in ctx.figures.items()})


def run_benchmark(spec: BenchmarkSpec, extractor: FeatureExtractor, out_dir: Path | None = None) -> BenchmarkResult:
    """Evaluate and collect; absent data -> ``skipped``, a failure -> ``error`` (with traceback)."""
    start = time.perf_counter()
    result = BenchmarkResult(spec.name, "ok")
    try:
        for name, value in iter_benchmark(spec, extractor, out_dir, result):
            result.metrics[name] = float(value)
    except DataUnavailable as e:
        result.status, result.message = "skipped", str(e)
    except Exception as e:  # one broken benchmark must not lose the others' results
        result.status = "error"
        result.message = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    result.seconds = round(time.perf_counter() - start, 3)
    return result
