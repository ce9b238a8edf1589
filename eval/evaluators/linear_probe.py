"""Linear probe (CLIP paper protocol): logistic regression on frozen image features.

C is swept over a log grid, each fitted on part of the training split and scored
on a held-out validation part; the best C (ties: the smaller, i.e. stronger
regularization) is refitted on the whole training split and tested on the
benchmark's split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from eval import metrics
from eval.context import EvalContext
from eval.evaluators.probe_data import holdout, probe_features
from eval.registry import Metric, register
from train.api import ConfigError


@dataclass
class LinearProbeOptions:
    """Options of the ``linear_probe`` evaluator."""

    train_split: str = "train"
    val_fraction: float = 0.2
    """Part of the training split held out to choose C."""
    c_grid: list[float] = field(default_factory=lambda: [10.0 ** e for e in range(-2, 6)])
    """Inverse regularization strengths tried (unit-norm features usually want large C)."""
    max_train_samples: int | None = None
    max_iter: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError("linear_probe.val_fraction must be in (0, 1)")
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ConfigError("linear_probe.c_grid must be positive numbers")


def _fit(x: np.ndarray, y: np.ndarray, c: float, opts: LinearProbeOptions):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=opts.max_iter, random_state=opts.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at tiny C are expected in a sweep
        return clf.fit(x, y)


@register("linear_probe", LinearProbeOptions, needs_labels=True)
def linear_probe(ctx: EvalContext, opts: LinearProbeOptions) -> Iterator[Metric]:
    """Yields linear_probe_acc1, linear_probe_mean_per_class_recall, linear_probe_C."""
    train_x, train_y, test_x, test_y = probe_features(ctx, opts.train_split, opts.max_train_samples, opts.seed)
    x, y = train_x.numpy(), train_y.numpy()
    fit_i, val_i = (i.numpy() for i in holdout(len(y), opts.val_fraction, opts.seed))
    best_c, best_acc = None, -1.0
    for c in sorted(opts.c_grid):
        if len(np.unique(y[fit_i])) < 2:
            best_c = c  # one class only: every C predicts it; keep the strongest regularization
            break
        acc = float((_fit(x[fit_i], y[fit_i], c, opts).predict(x[val_i]) == y[val_i]).mean())
        if acc > best_acc:  # strict: ties keep the smaller C
            best_c, best_acc = c, acc
    ctx.info["linear_probe_val_acc"] = best_acc
    if best_c in (min(opts.c_grid), max(opts.c_grid)) and len(opts.c_grid) > 1:
        ctx.info["linear_probe_C_at_grid_edge"] = True  # the optimum may lie outside the grid
    if len(np.unique(y)) < 2:
        pred = np.full(len(test_y), y[0])
    else:
        pred = _fit(x, y, best_c, opts).predict(test_x.numpy())
    import torch

    preds, targets = torch.from_numpy(np.asarray(pred)).long(), test_y
    n_classes = len(ctx.dataset.classnames)
    cm = metrics.confusion_matrix(preds, targets, n_classes)
    yield "linear_probe_acc1", float((preds == targets).double().mean())
    yield "linear_probe_mean_per_class_recall", metrics.mean_per_class_recall(cm)
    yield "linear_probe_C", float(best_c)
