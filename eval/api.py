"""Python entry point used by the trainer for periodic evaluation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from eval.benchmark import load_benchmark
from eval.features import FeatureExtractor, Partition
from eval.loaders import DataUnavailable
from eval.runner import BenchmarkResult, iter_benchmark


def evaluate(bundle: Any, benchmarks: list[str], device: str | torch.device = "cpu",
             out_dir: str | Path | None = None, *, batch_size: int = 256, progress: bool = False,
             max_samples: int | None = None, partition: Partition | None = None, write: bool = True,
             figures: dict[str, Path] | None = None) -> Iterator[tuple[str, float]]:
    """Evaluate a model on benchmarks; yields ``("<benchmark>/<metric>", value)``.

    The same code path as ``python -m eval run``. Features are cached within this
    call only (the model changes between calls during training). A benchmark whose
    data is absent is skipped with a message on stderr; other failures raise.

    Distributed: give every rank the same arguments plus its ``partition``; each rank
    encodes its share of the images, all ranks yield the same values (see
    :mod:`eval.features` for the invariant), and only the rank called with
    ``write=True`` writes files and messages.

    Args:
        bundle: a ``train.model.ClipBundle`` (model, tokenizer, eval_transform).
        benchmarks: names in configs/benchmarks or YAML paths.
        device: where to run the model (it is left in its train/eval mode afterwards).
        out_dir: where evaluators may write files (per benchmark sub-folder); None = none.
        batch_size: images or texts per forward pass.
        progress: show progress bars.
        max_samples: evaluate at most this many samples per benchmark (quick checks).
        partition: this rank's share of a distributed evaluation; None = all here.
        write: False = write no files and print no messages, whatever ``out_dir``
            (the non-main ranks of a partitioned evaluation).
        figures: filled during the call with ``{"<benchmark>/<name>": png_path}`` for
            every picture written (confusion matrices, retrieval examples), e.g. for
            TensorBoard; a benchmark's entries appear once its metrics have been yielded.
    """
    extractor = FeatureExtractor(bundle, device, batch_size=batch_size, progress=progress, partition=partition)
    overrides = {"max_samples": max_samples} if max_samples is not None else None
    for name in benchmarks:
        spec = load_benchmark(name, overrides)
        sub = Path(out_dir) / spec.name if out_dir is not None and write else None
        record = BenchmarkResult(spec.name, "ok")
        try:
            for metric, value in iter_benchmark(spec, extractor, sub, record):
                yield f"{spec.name}/{metric}", float(value)
        except DataUnavailable as e:
            if write:
                print(f"[eval] skipping benchmark {spec.name}: {e}", file=sys.stderr, flush=True)
        finally:
            if figures is not None:
                figures.update({f"{spec.name}/{k}": Path(v) for k, v in record.figures.items()})


def check_benchmarks(benchmarks: list[str]) -> None:
    """Raise ``ConfigError`` naming the first benchmark that does not exist or does not parse.

    The trainer calls this before training, so that a typo in ``eval.benchmarks`` is a
    one-line error at start instead of a failure at the first evaluation, hours later.
    """
    for name in benchmarks:
        load_benchmark(name)
