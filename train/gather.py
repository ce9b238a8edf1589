"""Gathering features across ranks *with* gradient, and reducing metrics.

The contrastive losses compare each rank's local rows with the columns of every
rank. For DDP's gradient averaging to reproduce the single-process full-batch
gradient, the gradient that rank ``r``'s loss sends to rank ``q``'s features must
reach rank ``q``: the gather's backward sums the incoming gradients over ranks and
hands each rank the slice of its own rows.

``torch.distributed.nn.functional.all_gather`` does this and works on gloo, but it is
deprecated in torch 2.13 (a FutureWarning on every call), so the few lines live here
as an autograd Function: backward is a reduce-scatter on NCCL and, elsewhere, an
all-reduce followed by taking the own slice (torch's version emulates the
reduce-scatter with ``world`` scatters on gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group (1 when not initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Rank of this process in the default group (0 when not initialized)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, me = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        local = grad.shape[0] // world
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty((local, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        # all_reduce works in place: never touch the incoming gradient buffer.
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[me * local : (me + 1) * local]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    Every rank must pass a tensor of the same shape (the data loader gives every rank
    the same local batch). Backward returns to each rank the sum over ranks of the
    gradient flowing into its own slice.

    Args:
        x: local tensor ``[B, ...]``.

    Returns:
        ``[world * B, ...]``, rank ``r``'s rows at ``[r*B, (r+1)*B)``; ``x`` itself on 1 process.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_with_grad`, but gradient only reaches the local slice.

    This is the classic mistake (other ranks' rows are constants). It is kept for the
    tests that prove the equivalence test detects a broken gather; never use it to train.
    """
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average a (detached) tensor over ranks; no host sync, no gradient.

    Used for logging: the mean of the per-rank losses equals the full-batch loss.
    """
    x = x.detach().clone()
    n = world_size()
    if n > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= n
    return x
