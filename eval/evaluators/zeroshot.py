"""Zero-shot classification: class names x templates, prompt-ensembled."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from eval import metrics
from eval.context import EvalContext, EvalError
from eval.figures import confusion_png
from eval.prompts import zeroshot_weights
from eval.registry import Metric, register
from train.api import ConfigError


@dataclass
class ZeroShotOptions:
    """Options of the ``zeroshot`` evaluator."""

    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10])
    """Top-k accuracies to report as ``acc{k}`` (k >= #classes gives 1.0 by definition)."""
    confusion: bool = True
    """Write confusion.json and confusion.png to the output folder (when there is one)."""

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("zeroshot.ks must be positive integers")


@register("zeroshot", ZeroShotOptions, needs_labels=True)
def zeroshot(ctx: EvalContext, opts: ZeroShotOptions) -> Iterator[Metric]:
    """Yields acc{k}, mean_per_class_recall, weighted_f1, n_samples."""
    idx, labels = ctx.labelled()
    ds = ctx.dataset
    if not ds.templates:
        raise EvalError(f"benchmark {ctx.spec.name}: zero-shot needs templates")
    targets = torch.tensor(labels)
    images = ctx.extractor.image_features(ds)[idx]
    weights = zeroshot_weights(ctx.extractor.text_features, ds.classnames, ds.templates)
    scores = images @ weights.T
    for k, acc in metrics.topk_accuracy(scores, targets, opts.ks).items():
        yield f"acc{k}", acc
    preds = metrics.predict(scores, targets)
    cm = metrics.confusion_matrix(preds, targets, len(ds.classnames))
    yield "mean_per_class_recall", metrics.mean_per_class_recall(cm)
    yield "weighted_f1", metrics.weighted_f1(cm)
    yield "n_samples", float(len(idx))
    path = ctx.figure_path("confusion") if opts.confusion else None  # None without an output folder
    if path is not None:
        write_confusion(cm, ds.classnames, path.parent)
        confusion_png(cm, ds.classnames, path, title=f"{ctx.spec.name} zero-shot confusion")


def write_confusion(cm: torch.Tensor, classnames: list[str], out_dir: Path) -> Path:
    """confusion.json: the matrix (rows = true class) with its class names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "confusion.json"
    path.write_text(json.dumps({"classnames": classnames, "rows": "true class", "columns": "predicted class",
                                "matrix": cm.tolist()}, indent=1))
    return path
