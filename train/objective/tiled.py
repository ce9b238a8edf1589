"""Memory-flat contrastive losses: logits in blocks, never the whole ``B x N`` matrix.

The plain losses (:mod:`.loss`, kept as the reference) hold the local-rows x global-columns
logits of both directions and their softmax: ``4 * B * N * 4`` bytes, 64 GiB at 65k. Here the
loss is a sum over blocks of ``block x block`` logits (Inf-CL's idea):

- forward: per row block, the log-sum-exp over column blocks is combined online
  (``logaddexp`` of block LSEs); only the ``[B]`` row LSEs are kept for the backward;
- backward: each block is recomputed, turned into its probabilities with the saved LSEs,
  and multiplied into the feature gradients straight away (``P @ Y``, ``P^T @ X``); the
  scale's gradient comes from the same products (``sum(X * (P @ Y))``), so no second block
  is ever alive.

Everything is computed in fp32 whatever the features' dtype; gradients are returned in the
inputs' dtypes. Across ranks the features are gathered with gradient as for the plain
losses, so gradients for other ranks' rows travel back through the same gather; the
scaling contract of :mod:`.loss` holds unchanged. Peak memory of the loss is the inputs,
their gradients, ``O(B + N)`` vectors and about three ``block x block`` fp32 buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.objective import gather as _gather
from train.objective.gather import GatherFn


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation copy of an input: fp32 (fp64 stays fp64, for tests)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _positives(x: torch.Tensor, y: torch.Tensor, offset: int) -> torch.Tensor:
    """``x_i . y_{offset+i}``: each local row against its own pair among the global columns."""
    return (x * y[offset:offset + x.shape[0]]).sum(1)


def _row_lse(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """``logsumexp_j(scale * x_i . y_j)`` for every row ``i``, one block of logits at a time."""
    lse = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
    for r in _blocks(x.shape[0], block):
        for c in _blocks(y.shape[0], block):
            z = torch.mm(x[r], y[c].T).mul_(scale)
            lse[r] = torch.logaddexp(lse[r], torch.logsumexp(z, dim=1))
    return lse


def _softmax_backward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor, block: int,
                      gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Add ``sum_ij p_ij d(scale x_i.y_j)`` into ``gx``/``gy`` (unit weights); returns the scale term."""
    gs = torch.zeros((), dtype=x.dtype, device=x.device)
    for r in _blocks(x.shape[0], block):
        for c in _blocks(y.shape[0], block):
            p = torch.mm(x[r], y[c].T).mul_(scale).sub_(lse[r, None]).exp_()
            py = p @ y[c]
            gs += (x[r] * py).sum()
            gx[r] += py.mul_(scale)
            gy[c] += torch.mm(p.T, x[r]).mul_(scale)  # scale stays a tensor: no host read
    return gs


class _TiledClip(torch.autograd.Function):
    """``(CE(s I_r T^T) + CE(s T_r I^T)) / 2`` over the local rows, tiled (see the module docstring)."""

    @staticmethod
    def forward(ctx, img, txt, all_img, all_txt, scale, offset: int, block: int):  # noqa: D102
        x1, y1, x2, y2 = (_acc(t) for t in (img, txt, all_txt, all_img))
        s = _acc(scale)
        lse_i = _row_lse(x1, x2, s, block)  # local images against all texts
        lse_t = _row_lse(y1, y2, s, block)  # local texts against all images
        pos_i, pos_t = _positives(x1, x2, offset), _positives(y1, y2, offset)
        loss = ((lse_i - s * pos_i).sum() + (lse_t - s * pos_t).sum()) / (2 * img.shape[0])
        ctx.save_for_backward(img, txt, all_img, all_txt, scale, lse_i, lse_t)
        ctx.offset, ctx.block = offset, block
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        img, txt, all_img, all_txt, scale, lse_i, lse_t = ctx.saved_tensors
        x1, y1, ai, at = (_acc(t) for t in (img, txt, all_img, all_txt))
        s, off, b = _acc(scale), ctx.offset, img.shape[0]
        gx1, gy1, gai, gat = (torch.zeros_like(t) for t in (x1, y1, ai, at))
        gs = _softmax_backward(x1, at, s, lse_i, ctx.block, gx1, gat)
        gs += _softmax_backward(y1, ai, s, lse_t, ctx.block, gy1, gai)
        # The positives' term: -s x_i . y_{off+i} in both directions.
        rows = slice(off, off + b)
        gx1 -= s * at[rows]
        gat[rows] -= s * x1
        gy1 -= s * ai[rows]
        gai[rows] -= s * y1
        gs -= _positives(x1, at, off).sum() + _positives(y1, ai, off).sum()
        k = _acc(grad) / (2 * b)
        return (gx1.mul_(k).to(img.dtype), gy1.mul_(k).to(txt.dtype), gai.mul_(k).to(all_img.dtype),
                gat.mul_(k).to(all_txt.dtype), (gs * k).to(scale.dtype).reshape(scale.shape), None, None)


class _TiledSigLip(torch.autograd.Function):
    """``-sum_ij logsigmoid(y_ij (s I_i.T_j + b)) / B`` over local images x all texts, tiled."""

    @staticmethod
    def forward(ctx, img, all_txt, scale, bias, offset: int, block: int):  # noqa: D102
        x, y, s, bb = _acc(img), _acc(all_txt), _acc(scale), _acc(bias)
        # -logsigmoid(-z) = softplus(z) for every pair, and -logsigmoid(z) = softplus(z) - z
        # for the positives: the loss is a plain sum of softplus over blocks, minus the positives.
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        for r in _blocks(x.shape[0], block):
            for c in _blocks(y.shape[0], block):
                total += F.softplus(torch.mm(x[r], y[c].T).mul_(s).add_(bb)).sum()
        total -= (s * _positives(x, y, offset) + bb).sum()
        ctx.save_for_backward(img, all_txt, scale, bias)
        ctx.offset, ctx.block = offset, block
        return total / img.shape[0]

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        img, all_txt, scale, bias = ctx.saved_tensors
        x, y, s, bb = _acc(img), _acc(all_txt), _acc(scale), _acc(bias)
        off, n = ctx.offset, img.shape[0]
        gx, gy = torch.zeros_like(x), torch.zeros_like(y)
        gs = torch.zeros((), dtype=x.dtype, device=x.device)
        gb = torch.zeros((), dtype=x.dtype, device=x.device)
        for r in _blocks(x.shape[0], ctx.block):
            for c in _blocks(y.shape[0], ctx.block):
                p = torch.mm(x[r], y[c].T).mul_(s).add_(bb).sigmoid_()
                py = p @ y[c]
                gs += (x[r] * py).sum()
                gb += p.sum()
                gx[r] += py.mul_(s)
                gy[c] += torch.mm(p.T, x[r]).mul_(s)
        rows = slice(off, off + n)
        gx -= s * y[rows]
        gy[rows] -= s * x
        gs -= _positives(x, y, off).sum()
        gb -= n
        k = _acc(grad) / n
        return (gx.mul_(k).to(img.dtype), gy.mul_(k).to(all_txt.dtype), (gs * k).to(scale.dtype).reshape(scale.shape),
                (gb * k).to(bias.dtype).reshape(bias.shape), None, None)


class _Tiled(nn.Module):
    """What both tiled losses hold: the block size and how features are gathered across ranks."""

    def __init__(self, block_size: int = 4096, gather_fn: GatherFn | None = None) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"loss.block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.gather_fn = gather_fn or _gather.all_gather_with_grad


class TiledClipLoss(_Tiled):
    """:class:`~train.objective.loss.ClipLoss`'s value and gradients in ``O(block^2)`` memory.

    The logit bias, if any, cancels in both softmaxes (its gradient is exactly 0); it is
    added to the graph with a zero weight so DDP sees every parameter used.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of the local rows (same contract as :class:`~train.objective.loss.ClipLoss`)."""
        all_images = self.gather_fn(image_features)
        all_texts = self.gather_fn(text_features)
        offset = _gather.rank() * image_features.shape[0]
        loss = _TiledClip.apply(image_features, text_features, all_images, all_texts, logit_scale, offset,
                                self.block_size)
        if logit_bias is not None:
            loss = loss + 0.0 * logit_bias.sum()
        return loss


class TiledSigLipLoss(_Tiled):
    """:class:`~train.objective.loss.SigLipLoss`'s value and gradients in ``O(block^2)`` memory."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of the local image rows against all texts (contract of :class:`~train.objective.loss.SigLipLoss`)."""
        if logit_bias is None:
            raise ValueError("SigLIP loss needs a model with a logit_bias (set model.init_logit_bias, e.g. -10)")
        all_texts = self.gather_fn(text_features)
        offset = _gather.rank() * image_features.shape[0]
        return _TiledSigLip.apply(image_features, all_texts, logit_scale, logit_bias, offset, self.block_size)
