"""A small MLP head on frozen image features (torch, deterministic seed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from eval import metrics
from eval.context import EvalContext
from eval.evaluators.probe_data import probe_features
from eval.registry import Metric, register
from train.api import ConfigError


@dataclass
class MlpProbeOptions:
    """Options of the ``mlp_probe`` evaluator."""

    train_split: str = "train"
    hidden: int = 256
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    max_train_samples: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("mlp_probe: hidden, epochs, batch_size and lr must be positive")


class _Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train_mlp(x: torch.Tensor, y: torch.Tensor, num_classes: int, opts: MlpProbeOptions) -> nn.Module:
    """Fit a one-hidden-layer MLP; the same inputs and seed give the same weights."""
    g = torch.Generator().manual_seed(opts.seed)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(opts.seed)
        mlp = nn.Sequential(nn.Linear(x.shape[1], opts.hidden), nn.ReLU(), nn.Linear(opts.hidden, num_classes))
    # unit-norm CLIP features have tiny per-dimension scale: standardize with train statistics
    head = nn.Sequential(_Standardize(x.mean(0), x.std(0, unbiased=False) + 1e-6), mlp)
    opt = torch.optim.AdamW(mlp.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    with torch.enable_grad():
        for _ in range(opts.epochs):
            for batch in torch.randperm(len(y), generator=g).split(opts.batch_size):
                opt.zero_grad(set_to_none=True)
                loss_fn(head(x[batch]), y[batch]).backward()
                opt.step()
    return head.eval()


@register("mlp_probe", MlpProbeOptions, needs_labels=True)
def mlp_probe(ctx: EvalContext, opts: MlpProbeOptions) -> Iterator[Metric]:
    """Yields mlp_probe_acc1 and mlp_probe_mean_per_class_recall."""
    train_x, train_y, test_x, test_y = probe_features(ctx, opts.train_split, opts.max_train_samples, opts.seed)
    n_classes = len(ctx.dataset.classnames)
    head = train_mlp(train_x, train_y, n_classes, opts)
    with torch.no_grad():
        preds = metrics.predict(head(test_x), test_y)
    cm = metrics.confusion_matrix(preds, test_y, n_classes)
    yield "mlp_probe_acc1", float((preds == test_y).double().mean())
    yield "mlp_probe_mean_per_class_recall", metrics.mean_per_class_recall(cm)
