"""Gathering features across ranks *with* gradient, for the losses.

The contrastive losses compare each rank's local rows with the columns of every rank. For
DDP's gradient averaging to reproduce the single-process full-batch gradient, the gradient
that rank ``r``'s loss sends to rank ``q``'s features must reach rank ``q``: the gather's
backward sums the incoming gradients over ranks and hands each rank the slice of its own
rows. The collectives themselves are :class:`train.core.collectives.Comm`'s.
"""

from __future__ import annotations

from typing import Callable

import torch

from train.core.collectives import current

GatherFn = Callable[[torch.Tensor], torch.Tensor]
"""How a loss gathers features across ranks (:func:`all_gather_with_grad`; tests swap it)."""


def world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return current().world


def rank() -> int:
    """Rank of this process (0 without a process group)."""
    return current().rank


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    Every rank must pass a tensor of the same shape (the data loader gives every rank
    the same local batch). Backward returns to each rank the sum over ranks of the
    gradient flowing into its own slice.

    Returns:
        ``[world * B, ...]``, rank ``r``'s rows at ``[r*B, (r+1)*B)``; ``x`` itself on 1 process.
    """
    return current().all_gather_with_grad(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_with_grad`, but gradient only reaches the local slice.

    This is the classic mistake (other ranks' rows are constants). It is kept for the
    tests that prove the equivalence test detects a broken gather; never use it to train.
    """
    comm = current()
    if comm.world == 1:
        return x
    full = comm.all_gather(x)
    b = x.shape[0]
    return torch.cat([full[: comm.rank * b], x, full[(comm.rank + 1) * b:]], dim=0)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average a (detached) tensor over ranks; no host sync, no gradient.

    Used for logging: the mean of the per-rank losses equals the full-batch loss.
    """
    return current().all_reduce(x.detach(), "mean")
