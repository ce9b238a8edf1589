"""Python entry point used by the trainer for periodic evaluation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from eval.benchmark import load_benchmark
from eval.features import FeatureExtractor
from eval.loaders import DataUnavailable
from eval.runner import iter_benchmark


def evaluate(bundle: Any, benchmarks: list[str], device: str | torch.device = "cpu",
             out_dir: str | Path | None = None, *, batch_size: int = 256, progress: bool = False,
             max_samples: int | None = None) -> Iterator[tuple[str, float]]:
    """Evaluate a model on benchmarks; yields ``("<benchmark>/<metric>", value)``.

    The same code path as ``python -m eval run``. Features are cached within this
    call only (the model changes between calls during training). A benchmark whose
    data is absent is skipped with a message on stderr; other failures raise.

    Args:
        bundle: a ``train.model.ClipBundle`` (model, tokenizer, eval_transform).
        benchmarks: names in configs/benchmarks or YAML paths.
        device: where to run the model (it is left in its train/eval mode afterwards).
        out_dir: where evaluators may write files (per benchmark sub-folder); None = none.
        batch_size: images or texts per forward pass.
        progress: show progress bars.
        max_samples: evaluate at most this many samples per benchmark (quick checks).
    """
    extractor = FeatureExtractor(bundle, device, batch_size=batch_size, progress=progress)
    overrides = {"max_samples": max_samples} if max_samples is not None else None
    for name in benchmarks:
        spec = load_benchmark(name, overrides)
        sub = Path(out_dir) / spec.name if out_dir is not None else None
        try:
            for metric, value in iter_benchmark(spec, extractor, sub):
                yield f"{spec.name}/{metric}", float(value)
        except DataUnavailable as e:
            print(f"[eval] skipping benchmark {spec.name}: {e}", file=sys.stderr, flush=True)
