"""Ranking and classification metrics on score matrices, with one tie policy.

Tie policy (pessimistic, deterministic): an item's *rank* is the number of
competing items that score **greater than or equal to** it. A tie with a wrong
answer therefore counts against the model, so a collapsed model (all scores
equal) gets top-1 accuracy 0 rather than the 1/C an arbitrary tie-break would
give it, and the result never depends on the order of the classes.

Consequences:
- top-k accuracy: hit iff rank of the true class < k. For k >= number of classes
  every sample is a hit (rank <= C-1 < k): accuracy is 1.0 by definition.
- retrieval with several correct items (e.g. five captions per image): the rank
  is counted for the best-scoring correct item, against wrong items only.
- predictions (confusion matrix, F1, per-class recall) break ties *against*
  the target, so they agree with top-1 accuracy exactly.
"""

from __future__ import annotations

import torch

# Rows of the similarity matrix handled at once; keeps memory flat for 10k x 50k.
_CHUNK = 1024


def class_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank of each row's true class.

    Args:
        scores: float[N, C] class scores.
        targets: long[N] true class indices.

    Returns:
        long[N]: number of *other* classes scoring >= the true class.
    """
    true = scores.gather(1, targets[:, None])
    return (scores >= true).sum(1) - 1


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """Top-k accuracy for each k (k >= C gives 1.0, see the module docstring)."""
    if len(targets) == 0:
        raise ValueError("top-k accuracy of an empty set is undefined")
    ranks = class_ranks(scores, targets)
    return {k: (ranks < k).double().mean().item() for k in ks}


def predict(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Arg-max class with ties broken against the target (lowest other index).

    This keeps ``(predict(...) == targets).mean()`` equal to top-1 accuracy
    under the pessimistic tie policy.
    """
    best = scores.max(1, keepdim=True).values
    tied = scores >= best
    wrong_tied = tied.clone()
    wrong_tied[torch.arange(len(targets)), targets] = False
    has_wrong = wrong_tied.any(1)
    # argmax of a bool tensor is the first True index
    return torch.where(has_wrong, wrong_tied.byte().argmax(1), targets)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """long[C, C] with rows = true class, columns = predicted class."""
    flat = targets.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_per_class_recall(cm: torch.Tensor) -> float:
    """Mean over classes *present in the targets* of TP / (row total)."""
    support = cm.sum(1)
    present = support > 0
    recall = cm.diagonal()[present].double() / support[present].double()
    return recall.mean().item()


def weighted_f1(cm: torch.Tensor) -> float:
    """F1 per class weighted by support (sklearn's ``average='weighted'``).

    A class with no predictions and no support contributes nothing; precision
    with no predictions is taken as 0 (sklearn's zero_division=0).
    """
    tp = cm.diagonal().double()
    support = cm.sum(1).double()
    predicted = cm.sum(0).double()
    denom = support + predicted
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return (f1 * support).sum().item() / support.sum().item()


def retrieval_ranks(
    sim: torch.Tensor, positive: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Pessimistic rank of each query's best correct item.

    Args:
        sim: float[Q, D] query-to-item similarities.
        positive: bool[Q, D], True where the item is a correct answer.
        ignore: optional bool[Q, D], items excluded from the query entirely
            (e.g. the query image itself in leave-one-out image->image).

    Returns:
        long[Q]: number of wrong, non-ignored items scoring >= the best correct one.

    Raises:
        ValueError: if a query has no correct item.
    """
    out = []
    for start in range(0, sim.shape[0], _CHUNK):
        s = sim[start:start + _CHUNK]
        pos = positive[start:start + _CHUNK]
        neg = ~pos
        if ignore is not None:
            ign = ignore[start:start + _CHUNK]
            pos = pos & ~ign
            neg = neg & ~ign
        if not bool(pos.any(1).all()):
            bad = int((~pos.any(1)).nonzero()[0]) + start
            raise ValueError(f"query {bad} has no correct item to retrieve")
        best = s.masked_fill(~pos, float("-inf")).max(1, keepdim=True).values
        out.append(((s >= best) & neg).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def recall_at_k(ranks: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """Fraction of queries whose best correct item has rank < k."""
    if len(ranks) == 0:
        raise ValueError("recall of an empty query set is undefined")
    return {k: (ranks < k).double().mean().item() for k in ks}
