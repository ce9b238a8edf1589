"""Frozen-feature train/test sets shared by the linear and MLP probes."""

from __future__ import annotations

import torch

from eval.context import EvalContext, EvalError


def probe_features(ctx: EvalContext, train_split: str, max_train_samples: int | None,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y) on frozen image features.

    The test set is the benchmark's evaluated split; the training set is ``train_split``
    of the same data, which must be a different split (else the probe is tested on
    what it was fitted on).
    """
    if train_split == ctx.spec.data.split:
        raise EvalError(f"benchmark {ctx.spec.name}: probe train_split {train_split!r} "
                        f"is the evaluated split; that would test on training data")
    test_idx, test_y = ctx.labelled()
    train_ds = ctx.load_split(train_split)
    if train_ds.classnames != ctx.dataset.classnames:
        raise EvalError(f"benchmark {ctx.spec.name}: class lists of splits differ")
    train_idx = train_ds.labelled
    if max_train_samples is not None and len(train_idx) > max_train_samples:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train_idx), generator=g)[:max_train_samples].sort().values
        train_idx = [train_idx[i] for i in pick.tolist()]
    if not train_idx:
        raise EvalError(f"benchmark {ctx.spec.name}: split {train_split!r} has no labelled samples")
    train_x = ctx.extractor.image_features(train_ds)[train_idx]
    train_y = torch.tensor([train_ds.labels[i] for i in train_idx])
    test_x = ctx.extractor.image_features(ctx.dataset)[test_idx]
    return train_x, train_y, test_x, torch.tensor(test_y)


def holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (fit, val) index split of ``range(n)``; val gets >= 1 item."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return perm[n_val:], perm[:n_val]
